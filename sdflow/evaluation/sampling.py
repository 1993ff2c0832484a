"""Sampling for the evaluate stage: the models it scores, loaded as pipelines, and seeded batches.

- `scored_model`: which of the train stage's models `eval.checkpoints` scores (final or best).
- `load_trained`: the train stage's pipeline, or its base model with the LoRA weights loaded.
- `load_baseline`: the model training started from (the seeded scratch UNet, or the pretrained base).
- `load_checkpoint_pipeline`: the trained pipeline with one checkpoint's UNet (`eval.checkpoints`).
- `generate`: (prompt, seed) jobs in batches of `eval.batch_size`, each image from its own seeded CPU
  generator, so a sample does not depend on the batch it was drawn in or on the device.

Pipelines are of the run's model family (`sdflow.models.families`); an SDXL pipeline is size-conditioned
on the evaluation resolution (original and target size = `download.resolution`, crop (0, 0)).
Every pipeline samples with `eval.scheduler`, on the GPU when there is one, in the training
precision there (float32 on a CPU), without progress bars.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from diffusers import DiffusionPipeline as Pipeline

from sdflow.config import RunConfig
from sdflow.errors import UserError
from sdflow.evaluation.features import to_uint8
from sdflow.models.adapters import load_adapters
from sdflow.models.components import (
    ComponentSources,
    absolute_source,
    build_unet,
    component_sources,
    is_hub_name,
    load_component,
)
from sdflow.models.families import family_of
from sdflow.models.hub import pinned
from sdflow.ops.gpuslots import torch_device
from sdflow.store.stageio import Manifest, output_dir

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm": DPMSolverMultistepScheduler,
}
SEED_STRIDE = 1000  # seed of image j of prompt i: eval.seed + i * SEED_STRIDE + j


def scored_model(config: RunConfig, train: Manifest) -> tuple[str, int | None]:
    """(the train manifest's `files` entry, step) of the trained model `eval.checkpoints` scores.

    `best`: the exported model (`pipeline`/`lora`), which with `train.keep_best` is the checkpoint
    of the lowest validation loss. `final` and `all`: the last step's model, which with
    `train.keep_best` is exported beside the best as `final_pipeline`/`final_lora`.
    """
    files = train["files"]
    kind = "pipeline" if "pipeline" in files else "lora"
    steps = train.get("counts", {}).get("steps")
    if config.eval.checkpoints != "best":
        return (f"final_{kind}" if f"final_{kind}" in files else kind), steps
    best = train.get("info", {}).get("validation", {}).get("best_step")
    if best is None or f"final_{kind}" not in files:
        raise UserError(
            f"eval.checkpoints is 'best' but the train stage output {train['path']} has no best "
            "model: it validated nothing (train.validate_every larger than the steps run?) or ran "
            "without train.keep_best. Use eval.checkpoints 'final', or validate within the run."
        )
    return kind, best


def load_trained(
    config: RunConfig, train: Manifest, workdir: str, model: str | None = None
) -> Pipeline:
    """The train stage's pipeline, or its base model with the LoRA weights loaded; `model` names
    the `files` entry (default: the exported model, `pipeline` or `lora`)."""
    base = output_dir(workdir, train)
    files = train["files"]
    model = model or ("pipeline" if "pipeline" in files else "lora")
    if model not in files:
        raise UserError(f"The train stage output {base} has no {model} (files: {sorted(files)}).")
    if "pipeline" in model:
        pipe = family_of(config).pipeline_class.from_pretrained(base / files[model])
        return _prepare(pipe, config)
    return load_adapters(load_base(config, train), base / files[model])


def load_baseline(config: RunConfig, train: Manifest, workdir: str) -> Pipeline:
    """The model training started from: the seeded scratch UNet, or the pretrained base."""
    if config.model.init == "scratch":
        pipe = load_trained(config, train, workdir)
        pipe.unet = build_unet(config.model).to(pipe.device, pipe.dtype)
        return pipe
    return load_base(config, train)


def base_source(config: RunConfig, train: Manifest) -> str:
    source = train.get("info", {}).get("base_model") or config.model.pretrained
    if not source:
        raise UserError("Evaluating this model needs model.pretrained (its base model) to be set.")
    return source


def load_base(config: RunConfig, train: Manifest) -> Pipeline:
    model = config.model
    source = base_source(config, train)
    if not is_hub_name(source) and not Path(source).expanduser().is_dir():
        raise UserError(f"model.pretrained {source!r} is not a directory (the baseline model).")
    family = family_of(config)
    kwargs: dict[str, Any] = family.load_kwargs()
    if source == model.pretrained:
        kwargs.update(pinned(source, model.revision, is_hub_name(source)), variant=model.variant)
    kwargs["use_safetensors"] = None if model.allow_pickle_weights else True  # no pickles
    try:
        pipe = family.pipeline_class.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"Could not load the base model {source!r}: {exc}") from exc
    if model.vae:  # training encoded latents with this VAE, so sampling must decode with it
        sources = component_sources(config, {}, "")
        pipe.vae = load_component(sources.vae, sources.vae_subfolder, AutoencoderKL, model)
    return _prepare(pipe, config)


def _prepare(pipe: Pipeline, config: RunConfig) -> Pipeline:
    """Eval scheduler, device and precision, no progress bars."""
    if family_of(config).objective == "ddpm":  # sd3 and flux keep their FlowMatchEuler sampler
        scheduler = SCHEDULERS[config.eval.scheduler]
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    device = torch_device()
    return pipe.to(device, pipeline_dtype(config.train.mixed_precision, device))


def pipeline_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Sample in the training precision on a GPU (half the memory, about twice as fast); a CPU
    has no fast half-precision kernels, so it samples in float32."""
    if device.type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def load_checkpoint_pipeline(
    config: RunConfig, train: Manifest, workdir: str, checkpoint: Path
) -> Pipeline:
    """The trained pipeline with the UNet of one checkpoint (EMA weights when `train.ema`)."""
    from sdflow.models.trainable import trained_unet

    model = config.model
    base = absolute_source(base_source(config, train)) if model.init == "pretrained" else None
    part = family_of(config).denoiser_part  # unet, or the transformer (sd3, flux)
    sources = ComponentSources("", None, None, None, None, None, base, base and part, None)
    unet = trained_unet(config, sources, checkpoint)
    lora = "lora" in train["files"]
    pipe = load_base(config, train) if lora else load_trained(config, train, workdir)
    setattr(pipe, part, unet.to(pipe.device, pipe.dtype))
    return pipe


def fid_sample_jobs(pool: Sequence[str], count: int, seed: int) -> list[tuple]:
    """FID sample k: caption i = k mod len(pool), image j = k div len(pool); seeds as the grid's."""
    n = len(pool)
    return [(pool[k % n], seed + (k % n) * SEED_STRIDE + k // n, None) for k in range(count)]


def generate(pipe, jobs: Sequence[tuple], config: RunConfig) -> Iterator[tuple[list, torch.Tensor]]:
    """Sample (prompt, seed, ...) jobs in batches of `eval.batch_size`; yields uint8 NCHW images."""
    ev, size = config.eval, config.download.resolution
    for start in range(0, len(jobs), ev.batch_size):
        batch = list(jobs[start : start + ev.batch_size])
        # CPU generators: the same seed gives the same starting noise on every device.
        generators = [torch.Generator("cpu").manual_seed(seed) for _, seed, _ in batch]
        with torch.no_grad():
            out = pipe(
                prompt=[prompt for prompt, _, _ in batch],
                generator=generators,
                num_inference_steps=ev.num_inference_steps,
                guidance_scale=ev.guidance_scale,
                height=size,
                width=size,
                output_type="np",
                **sequence_kwargs(config),
            )
        yield batch, to_uint8(np.asarray(out.images))


def sequence_kwargs(config: RunConfig) -> dict[str, Any]:
    """T5's caption length of the run (sd3, flux), so samples see what training saw."""
    length = config.model.max_sequence_length
    return {} if length is None else {"max_sequence_length": length}
