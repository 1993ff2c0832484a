"""Evaluate stage: samples, a labelled grid, FID and CLIP score, for the trained model and baseline.

Run it with `sdflow run tiny-cpu --only evaluate`. Both models sample the same prompts with the same
seeds (image j of prompt i uses seed `eval.seed + i*1000 + j`), so the grid shows before vs after
along each row and `metrics.json` says whether training helped (trained FID < baseline FID).

- Prompts: `eval.prompts`, else `eval.num_prompts` held-out captions, distinct ones first.
- FID: `eval.fid_samples` images generated from the held-out captions (cycled), against up to as
  many held-out real images; see `sdflow.metrics` for the two feature networks.
- CLIP score: every generated image against its prompt, when `eval.clip_model` is set; otherwise
  `null` with the reason, never a made-up number.
- Baseline: the scratch UNet as training started (`build_unet(model)`, same seed), or the pretrained
  model (`model.pretrained`) for full fine-tuning and LoRA.

Output: `samples/<trained|baseline>/pXXX-J.png`, `grid.png`, `metrics.json` (also the manifest's
info, which the flow copies into summary.json). Each model's scores are saved as they finish, so
a rerun after a crash skips the models already done.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from itertools import islice
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
    StableDiffusionPipeline,
)
from PIL import Image

from sdflow.config import RunConfig
from sdflow.errors import UserError
from sdflow.fingerprint import code_version
from sdflow.gpuslots import torch_device
from sdflow.grids import Block, render_grid, save_png
from sdflow.metrics import (
    Scorers,
    decode_image,
    fid_label,
    fid_note,
    fid_value,
    make_scorers,
    to_uint8,
)
from sdflow.models import build_unet, component_sources, is_hub_name, load_component, weights_hash
from sdflow.orchestration import stage_task
from sdflow.splits import is_held_out
from sdflow.stageio import (
    Manifest,
    StageBuild,
    build_stage,
    output_dir,
    read_shards,
    stage_key,
    write_json,
)

log = logging.getLogger(__name__)

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm": DPMSolverMultistepScheduler,
}
SEED_STRIDE = 1000  # seed of image j of prompt i: eval.seed + i * SEED_STRIDE + j
NO_CLIP_REASON = "eval.clip_model not set"


def evaluate_key(config: RunConfig, upstream: dict[str, Manifest | None]) -> str:
    """Trained model + captions + eval settings + resolution + the baseline's source + code."""
    model = config.model
    base = None
    if config.eval.baseline and model.init == "pretrained" and model.pretrained:
        base = weights_hash(model.pretrained, None, model.revision)  # a swapped base reruns
    parts = {
        "eval": config.eval.model_dump(mode="json"),
        "resolution": config.download.resolution,
        "model": model.model_dump(mode="json"),  # decides the baseline (scratch seed, base model)
        "base_weights": base,
    }
    stages = [upstream.get("train"), upstream.get("caption")]
    return stage_key("evaluate", parts, stages, code_version(__name__))


def evaluate(config: RunConfig, upstream: dict[str, Manifest | None], workdir: str) -> Manifest:
    """Sample, draw the grid and score trained vs baseline; returns the evaluate manifest."""
    for name in ("train", "caption"):
        if not upstream.get(name):
            raise UserError(f"The evaluate stage needs the {name} stage's output; run it first.")
    key = evaluate_key(config, upstream)
    return build_stage(workdir, "evaluate", key, lambda b: _build(b, config, upstream, workdir))


evaluate_task = stage_task("evaluate", evaluate_key)(evaluate)


def _build(build: StageBuild, config: RunConfig, upstream: dict, workdir: str) -> Manifest:
    ev = config.eval
    scorers = make_scorers(config.eval)  # first: a missing Inception file or CLIP dir fails early
    pool, held_prompts = held_out_prompts(workdir, upstream["caption"], config)
    prompts = list(ev.prompts) or held_prompts
    num_real = add_real_images(scorers, workdir, upstream["caption"], config)
    models = {"trained": lambda: load_trained(config, upstream["train"], workdir)}
    if ev.baseline:
        models["baseline"] = lambda: load_baseline(config, upstream["train"], workdir)
    results = {}
    for name, load in models.items():
        results[name] = _score_once(build, name, load, prompts, pool, scorers, config)
    names = {name: describe_model(name, config, upstream["train"]) for name in models}
    grid = _draw_grid(build.path, prompts, names, config)
    save_png(grid, build.path / "grid.png")
    metrics = summarise(results, names, prompts, num_real, config)
    write_json(build.path / "metrics.json", metrics)
    counts = {"prompts": len(prompts), "generated": ev.fid_samples, "real": num_real}
    files = {"grid": "grid.png", "metrics": "metrics.json", "samples": "samples"}
    return build.finish(counts=counts, files=files, info=metrics)


# ------------------------------------------------------------------------------- prompts and reals


def held_out_prompts(workdir: str, caption: Manifest, config: RunConfig) -> tuple[list, list]:
    """(pool, prompts): the first `eval.fid_samples` held-out captions in shard order (FID's
    prompts, matching its real images), and `eval.num_prompts` of them, distinct ones first."""
    ev = config.eval
    pool: list[str] = []
    distinct: dict[str, None] = {}
    repeats: list[str] = []
    for text in _held_out_captions(workdir, caption, ev.held_out_fraction):
        if len(pool) < ev.fid_samples:
            pool.append(text)
        if text in distinct:
            if len(repeats) < ev.num_prompts:
                repeats.append(text)
        elif len(distinct) < ev.num_prompts:
            distinct[text] = None
        if len(pool) >= ev.fid_samples and len(distinct) >= ev.num_prompts:
            break
    if not pool:
        raise UserError(
            f"No held-out samples to evaluate on: eval.held_out_fraction is "
            f"{ev.held_out_fraction}. Raise it (e.g. 0.05) or add data; held-out images are the "
            "real images FID compares against, and their captions the prompts."
        )
    return pool, (list(distinct) + repeats)[: ev.num_prompts]


def _held_out_captions(workdir: str, caption: Manifest, fraction: float) -> Iterator[str]:
    for table in read_shards(workdir, caption, columns=["id", "caption"]):
        ids, texts = table["id"].to_pylist(), table["caption"].to_pylist()
        for sample_id, text in zip(ids, texts, strict=True):
            if is_held_out(sample_id, fraction):
                yield text or ""


def add_real_images(scorers: Scorers, workdir: str, caption: Manifest, config: RunConfig) -> int:
    """Feed up to `eval.fid_samples` held-out images to FID as the real set, batch by batch."""
    ev = config.eval
    images = islice(_held_out_images(workdir, caption, config), ev.fid_samples)
    total = 0
    while batch := list(islice(images, ev.batch_size)):
        scorers.fid.update(torch.stack(batch).to(scorers.device), real=True)
        total += len(batch)
    if total < 2:
        raise UserError(
            f"FID needs at least 2 held-out real images, found {total}. Raise "
            "eval.held_out_fraction or add data."
        )
    return total


def _held_out_images(workdir: str, caption: Manifest, config: RunConfig) -> Iterator[torch.Tensor]:
    fraction, resolution = config.eval.held_out_fraction, config.download.resolution
    for table in read_shards(workdir, caption, columns=["id", "image"]):
        for sample_id, data in zip(
            table["id"].to_pylist(), table["image"].to_pylist(), strict=True
        ):
            if is_held_out(sample_id, fraction):
                yield decode_image(data, resolution)


# ---------------------------------------------------------------------------------------- models


def load_trained(config: RunConfig, train: Manifest, workdir: str) -> StableDiffusionPipeline:
    """The train stage's pipeline, or its base model with the LoRA weights loaded."""
    base = output_dir(workdir, train)
    files = train["files"]
    if "pipeline" in files:
        return _prepare(StableDiffusionPipeline.from_pretrained(base / files["pipeline"]), config)
    if "lora" not in files:
        raise UserError(f"The train stage output {base} has neither a pipeline nor LoRA weights.")
    pipe = _load_base(config, train)
    pipe.load_lora_weights(str(base / files["lora"]))
    return pipe


def load_baseline(config: RunConfig, train: Manifest, workdir: str) -> StableDiffusionPipeline:
    """The model training started from: the seeded scratch UNet, or the pretrained base."""
    if config.model.init == "scratch":
        pipe = load_trained(config, train, workdir)
        pipe.unet = build_unet(config.model).to(pipe.device, pipe.dtype)
        return pipe
    return _load_base(config, train)


def _load_base(config: RunConfig, train: Manifest) -> StableDiffusionPipeline:
    model = config.model
    source = train.get("info", {}).get("base_model") or model.pretrained
    if not source:
        raise UserError("Evaluating this model needs model.pretrained (its base model) to be set.")
    if not is_hub_name(source) and not Path(source).expanduser().is_dir():
        raise UserError(f"model.pretrained {source!r} is not a directory (the baseline model).")
    kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
    if source == model.pretrained:
        kwargs.update(revision=model.revision, variant=model.variant)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"Could not load the base model {source!r}: {exc}") from exc
    if model.vae:  # training encoded latents with this VAE, so sampling must decode with it
        vae, subfolder = component_sources(config, {}, "")[:2]
        pipe.vae = load_component(vae, subfolder, AutoencoderKL, model)
    return _prepare(pipe, config)


def _prepare(pipe: StableDiffusionPipeline, config: RunConfig) -> StableDiffusionPipeline:
    """Eval scheduler, device and precision, no progress bars."""
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


def describe_model(name: str, config: RunConfig, train: Manifest) -> str:
    model = config.model
    base = "scratch" if model.init == "scratch" else str(model.pretrained)
    if name == "trained":
        mode = "LoRA" if "lora" in train["files"] else "full"
        steps = train.get("counts", {}).get("steps", config.train.max_steps)
        best = train.get("info", {}).get("validation", {}).get("best_step")
        if "final_pipeline" in train["files"] or "final_lora" in train["files"]:
            steps = f"best validation loss at step {best} of {steps}"  # train.keep_best
        else:
            steps = f"{steps} steps"
        return f"trained: {base}, {mode}, {steps} (train {train['key'][:8]})"
    if model.init == "scratch":
        return f"baseline: scratch UNet untrained (model.seed {model.seed})"
    return f"baseline: {base} (before training)"


# ------------------------------------------------------------------------------ sampling, scoring


def _score_once(build, name, load, prompts, pool, scorers, config) -> dict[str, Any]:
    """Scores of one model, computed once: saved to scores-<name>.json and reused by a rerun."""
    done = build.path / f"scores-{name}.json"
    if done.is_file():
        log.info("evaluate: %s already scored in an earlier attempt", name)
        return json.loads(done.read_text())
    log.info("evaluate: sampling and scoring the %s model", name)
    pipe = load()
    scores = score_model(pipe, build.path / "samples" / name, prompts, pool, scorers, config)
    del pipe  # free the GPU before the next model loads
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    write_json(done, scores)
    log.info("evaluate: %s FID %.3f, CLIP score %s", name, scores["fid"], scores["clip_score"])
    return scores


def score_model(pipe, sample_dir: Path, prompts, pool, scorers: Scorers, config) -> dict[str, Any]:
    """Save the grid samples, then FID over the FID set and CLIP score over everything generated.

    `pool` holds the held-out captions the FID set cycles through.
    """
    ev = config.eval
    scorers.reset()
    sample_dir.mkdir(parents=True, exist_ok=True)
    grid_jobs = [
        (p, ev.seed + i * SEED_STRIDE + j, f"p{i:03d}-{j}.png")
        for i, p in enumerate(prompts)
        for j in range(ev.images_per_prompt)
    ]
    for batch, images in generate(pipe, grid_jobs, config):
        for (_, _, file), image in zip(batch, images, strict=True):
            save_png(Image.fromarray(image.permute(1, 2, 0).numpy()), sample_dir / file)
        scorers.add_prompted(images, [prompt for prompt, _, _ in batch])
    fid_jobs = fid_sample_jobs(pool, ev.fid_samples, ev.seed)
    for batch, images in generate(pipe, fid_jobs, config):
        scorers.add_generated(images, [prompt for prompt, _, _ in batch])
    result: dict[str, Any] = {"fid": fid_value(scorers.fid), "clip_score": None}
    result["clip_score_reason"] = None if scorers.clip else NO_CLIP_REASON
    if scorers.clip is not None:
        result["clip_score"] = float(scorers.clip.compute())
        result["clip_score_num_images"] = len(grid_jobs) + len(fid_jobs)
    return result


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
            )
        yield batch, to_uint8(np.asarray(out.images))


# ------------------------------------------------------------------------------- grid and summary


def _draw_grid(path: Path, prompts, names: dict[str, str], config: RunConfig) -> Image.Image:
    """Baseline block left (before), trained block right (after), read back from the samples."""
    ev = config.eval
    blocks = []
    for name in ("baseline", "trained"):
        if name in names:
            rows = [
                [
                    _open(path / "samples" / name / f"p{i:03d}-{j}.png")
                    for j in range(ev.images_per_prompt)
                ]
                for i in range(len(prompts))
            ]
            blocks.append(Block(name, rows))  # full names are in the title
    settings = (
        f"sdflow evaluate: {ev.scheduler}, {ev.num_inference_steps} steps, guidance "
        f"{ev.guidance_scale}, seed {ev.seed}, {config.download.resolution} px"
    )
    return render_grid(prompts, blocks, [settings, *names.values()])


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def summarise(results, names, prompts, num_real: int, config: RunConfig) -> dict[str, Any]:
    """metrics.json: both models' scores, how they were measured, and whether training helped."""
    ev = config.eval
    trained, baseline = results["trained"], results.get("baseline")
    metrics: dict[str, Any] = {
        "trained": {**trained, "name": names["trained"]},
        "baseline": {**baseline, "name": names["baseline"]} if baseline else None,
        "fid_feature_extractor": fid_label(ev.fid_features),
        "fid_note": fid_note(ev.fid_features),
        "comparable_to_published": ev.fid_features == "inception",
        "num_generated": ev.fid_samples,
        "num_real": num_real,
        "prompts": prompts,
        "images_per_prompt": ev.images_per_prompt,
        "guidance_scale": ev.guidance_scale,
        "num_inference_steps": ev.num_inference_steps,
        "scheduler": ev.scheduler,
        "resolution": config.download.resolution,
        "seed": ev.seed,
    }
    if baseline:
        metrics["training_helped"] = trained["fid"] < baseline["fid"]
    else:
        metrics["training_helped"] = None
        metrics["training_helped_reason"] = "eval.baseline is false: nothing to compare with"
    return metrics
