"""Train stage: the UNet trained on the cached latents, from scratch, fully fine-tuned, or with LoRA.

Run it with `sdflow run tiny-cpu --only train`. The loop (`sdflow.training.loop.train_unet`, in this
process or, for `train.processes` > 1, in supervised `accelerate launch` workers) checkpoints
into the stage's partial directory, so a retried or rerun task resumes from the newest complete
checkpoint and reaches the same weights as an uninterrupted run. Output: `pipeline/` (a diffusers
StableDiffusionPipeline or StableDiffusionXLPipeline, by the model family, EMA weights when
`train.ema`, sampling with the base model's scheduler or, from scratch, DDIM; the trained text
encoder with `train.text_encoder: full`) or, for LoRA, `lora/` (load it with
`pipe.load_lora_weights`; with `train.text_encoder: lora` it holds both adapters); `loss.png`,
TensorBoard `logs/`, and the last checkpoint (without the optimizer moments unless
`train.keep_optimizer_state`).

Validation (`train.validate_every`): the held-out loss curve goes into the manifest's info
(`validation`), TensorBoard and `loss.png`; a sample grid per validation into `logs/validation/`.
With `train.keep_best` the model exported as `pipeline/` (or `lora/`) is the checkpoint of the lowest
validation loss, and the last step's is exported beside it as `final-pipeline/` (`final-lora/`);
the manifest's `files` name both (`pipeline` / `final_pipeline`); evaluate scores the last step's
unless `eval.checkpoints: best`.

Continue training: the key is the run's lineage (`train_lineage`) plus `train.max_steps`, so a run
asked for more steps is a new output that starts from the last checkpoint of the longest finished
run of its lineage (`sdflow.training.continuation`) instead of from step 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextModel

from sdflow.config import RunConfig
from sdflow.config.subsets import subset_plan
from sdflow.evaluation.curves import draw_loss_curve
from sdflow.models.adapters import in_diffusers_format, save_peft_adapters
from sdflow.models.components import (
    ComponentSources,
    component_sources,
    is_hub_name,
    load_component,
)
from sdflow.models.families import family_of
from sdflow.models.files import canonical_safetensors, hub_commit, weights_hash
from sdflow.models.formats.card import CardFacts, base_license, write_card
from sdflow.models.formats.exports import EXPORT_FILES, write_exports
from sdflow.models.formats.single_file_base import file_hash
from sdflow.models.quantize import check_quantize, quantize_backend
from sdflow.models.schedulers import base_scheduler_config
from sdflow.models.trainable import trained_text_encoder, trained_unet
from sdflow.ops.orchestration import stage_task
from sdflow.store.checkpoints import load_checkpoint, prune_checkpoints, save_checkpoint, step_name
from sdflow.store.fingerprint import code_version
from sdflow.store.stageio import (
    Manifest,
    StageBuild,
    atomic_dir,
    build_stage,
    stage_key,
    write_atomic,
)
from sdflow.training.continuation import continue_from_predecessor
from sdflow.training.loop import CHECKPOINTS, LOGS
from sdflow.training.objectives import objective_of
from sdflow.training.optimizers import check_optimizer
from sdflow.training.processes import resolve_processes, run_training
from sdflow.training.schedules import bucket_plan
from sdflow.training.subsets import subset_report
from sdflow.training.trainer import TrainSummary

LOSS_CURVE = "loss.png"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights gives
# Settings that change no weight of the steps done: editing them never retrains. `max_steps` only
# says how many steps there are; it enters the key beside the lineage (see `train_lineage`).
NOT_IN_KEY = {
    "data_workers",
    "pin_memory",
    "prefetch_factor",
    "keep_checkpoints",
    "checkpoint_every",
    "log_every",
    "max_steps",
}
# Settings that change what is validated and exported but no weight of any step (validation draws
# nothing from the training generator): out of the lineage, so a run continues across them, but in
# the key, since the outputs differ. Early stop ends a run sooner: its steps are still the lineage's.
VALIDATION_KEYS = {
    "validate_every",
    "validation_samples",
    "validation_prompts",
    "validation_images",
    "validation_inference_steps",
    "keep_best",
    "early_stop_patience",
}
# What is written, not how: out of the lineage; in the key when an export beyond diffusers is asked.
EXPORT_KEYS = {"export_formats", "export_dtype"}
# lr schedules whose value at step t does not depend on the total number of steps: a longer run of
# these repeats the shorter one's steps exactly, so it can continue from it.
STEP_FREE_SCHEDULES = {"constant", "constant_with_warmup"}


def train_lineage(config: RunConfig, upstream: dict[str, Manifest | None]) -> str:
    """Fingerprint of everything that decides the weights after each step, but not how many
    steps there are (unless the lr schedule's shape depends on it): runs of one lineage agree on
    every step they share, so a longer one continues a finished shorter one."""
    model = config.model
    train = config.train.model_dump(exclude=NOT_IN_KEY | VALIDATION_KEYS | EXPORT_KEYS)
    train.pop("init_lora")  # unset: the keys of earlier runs stay what they were
    if train.get("prior_preservation") is None:  # likewise
        train.pop("prior_preservation", None)
    if config.train.init_lora:  # the adapter's content, not where it lies
        train["init_lora"] = file_hash(Path(config.train.init_lora).expanduser())
    if config.train.lr_scheduler not in STEP_FREE_SCHEDULES:  # e.g. cosine: lr(t) needs the total
        train["max_steps"] = config.train.max_steps
    # "auto" counts this host's GPUs: the world size, not the word, decides the weights
    train["processes"] = resolve_processes(config.train)
    # model.config is unset once a single-file base is its folder (named by the file's hash)
    settings: dict[str, Any] = {"train": train, "model": model.model_dump(exclude={"config"})}
    if model.init == "pretrained":  # the denoiser and scheduler weights come from here
        part = family_of(config).denoiser_part  # unet, or the transformer (sd3, flux)
        settings["unet"] = weights_hash(model.pretrained, part, model.revision)
        settings["scheduler"] = weights_hash(model.pretrained, "scheduler", model.revision)
    if config.subsets:  # repeats or weights shape the order; keys of one-source runs stay
        settings["subsets"] = subset_plan(config).settings()
    if model.quantize != "none":  # the quantized base's values come from its backend's version
        settings["quantize"] = quantize_backend(model.quantize)
    inputs = [upstream.get("latents"), upstream.get("autoencoder")]
    if upstream.get("class_images"):  # train.prior_preservation: the class rows
        inputs.append(upstream["class_images"])
    if not config.train.cache_latents:  # images and captions are read from the caption stage
        settings["encode"] = [config.download.resolution, config.eval.held_out_fraction]
        inputs.append(upstream.get("caption"))
    return stage_key("train", settings, inputs, code_version(__name__))


def train_key(config: RunConfig, upstream: dict[str, Manifest | None]) -> str:
    """The lineage and the number of steps: another step count is another output."""
    lineage = train_lineage(config, upstream)
    settings: dict[str, Any] = {"lineage": lineage, "max_steps": config.train.max_steps}
    if config.train.validate_every:  # keys of runs without validation stay what they were
        validation = config.train.model_dump(include=VALIDATION_KEYS)
        validation["grid"] = [config.eval.guidance_scale, config.download.resolution]
        settings["validation"] = validation
    if config.train.export_formats != [
        "diffusers"
    ]:  # keys of diffusers-only runs stay as they were
        settings["exports"] = config.train.model_dump(include=EXPORT_KEYS)
    return stage_key("train", settings)


def train(config: RunConfig, upstream: dict[str, Manifest | None], workdir: str) -> Manifest:
    key = train_key(config, upstream)
    return build_stage(workdir, "train", key, lambda b: _build(b, config, upstream, workdir))


train_task = stage_task("train", train_key)(train)


def _build(
    build: StageBuild, config: RunConfig, upstream: dict[str, Manifest | None], workdir: str
) -> Manifest:
    check_optimizer(config.train)  # before anything is written
    check_quantize(config)
    checkpoints = build.path / CHECKPOINTS
    lineage = train_lineage(config, upstream)
    origin = continue_from_predecessor(build.path, checkpoints, lineage, config.train.max_steps)
    summary = run_training(config, upstream, workdir, build.path)
    # The last one stays, for inspection or training on, and the best one (BEST), if marked;
    # `eval.checkpoints: all` scores every one `train.keep_checkpoints` kept, so they stay too.
    keep = config.train.keep_checkpoints if config.eval.checkpoints == "all" else 1
    prune_checkpoints(checkpoints, keep=keep)
    sources = component_sources(config, upstream, workdir)
    scheduler = objective_of(family_of(config)).noise_scheduler(config, sources)
    output = _export_models(config, sources, scheduler, build.path, summary)
    validation = summary.validation or {}
    curve = validation.get("curve")
    write_atomic(build.path / LOSS_CURVE, draw_loss_curve(summary.history, validation=curve))
    if validation.get("grid"):
        output["validation_grid"] = validation["grid"]
    write_cards(config, upstream, build.path, output, summary)
    if not config.train.keep_optimizer_state:
        drop_optimizer_state(checkpoints, summary.steps, keep)
    world = resolve_processes(config.train) * config.train.nodes  # every process's batches
    return build.finish(
        counts={
            "steps": summary.steps,
            "samples_seen": summary.samples_seen,
            "trainable_params": summary.trainable_params,
        },
        files={**output, "loss_curve": LOSS_CURVE, "logs": LOGS, "checkpoints": CHECKPOINTS},
        info={
            **_info(config, sources, summary, scheduler),
            **_buckets(config, upstream),
            **subset_report(config, upstream.get("latents"), workdir, summary.steps, world),
            "lineage": lineage,
            "continued_from": origin,
            **({"validation": summary.validation} if summary.validation else {}),
        },
    )


def _export_models(
    config: RunConfig, sources: ComponentSources, scheduler, out: Path, summary: TrainSummary
) -> dict[str, str]:
    """The model (`pipeline` or `lora`): the best checkpoint's with `train.keep_best`, else the
    last one's; with `train.keep_best` the last one's also as `final_pipeline` / `final_lora`.
    Beside each, the `train.export_formats` (`single_file`, `kohya_lora`; `final_` for the last)."""
    kind = "lora" if config.train.mode == "lora" else "pipeline"
    best = (summary.validation or {}).get("best_step") if config.train.keep_best else None

    def export(step: int, name: str) -> dict[str, str]:
        checkpoint = out / CHECKPOINTS / step_name(step)
        unet = trained_unet(config, sources, checkpoint)
        text_encoder = trained_text_encoder(config, sources, checkpoint)
        if kind == "lora":
            model = _save_lora(config, unet, out / name, text_encoder)
        else:
            model = _save_full(unet, config, sources, scheduler, out / name, text_encoder)
        family = family_of(config)
        encoders = family.text_modules(text_encoder) if text_encoder is not None else []
        formats = config.train.export_formats
        extra = write_exports(
            formats, family, out / model, config.train.export_dtype, unet, encoders
        )
        return {kind: model, **extra}

    if best is None:
        return export(summary.steps, kind)
    files = export(best, kind)
    final = files if best == summary.steps else export(summary.steps, f"final-{kind}")
    return {**files, **{f"final_{name}": value for name, value in final.items()}}


def _save_full(
    unet,
    config: RunConfig,
    sources: ComponentSources,
    trained: DDPMScheduler,
    out_dir: Path,
    text_encoder: CLIPTextModel | None = None,
) -> str:
    """The trained UNet with the run's VAE, text encoder (the trained one when
    `train.text_encoder: full`), tokenizer and a sampling scheduler (`inference_scheduler`: never
    the training DDPM one, which needs ~1000 steps to sample)."""
    family = family_of(config)
    vae = load_component(sources.vae, sources.vae_subfolder, AutoencoderKL, config.model)
    text = family.load_text(sources, config)
    if text_encoder is not None:  # the trained encoder(s) replace the base's
        text.encoders = family.text_modules(text_encoder)
    scheduler = objective_of(family).inference_scheduler(config, sources, trained)
    family.save_pipeline(out_dir, unet, vae, text, scheduler)
    return out_dir.name


def _save_lora(
    config: RunConfig, unet, out_dir: Path, text_encoder: CLIPTextModel | None = None
) -> str:
    """`pytorch_lora_weights.safetensors` in the diffusers format that `load_lora_weights` reads:
    the UNet's adapter and, with `train.text_encoder: lora`, the text encoder's (`text_encoder.`
    prefix), so one `load_lora_weights` call loads both.

    Each adapter's LoraConfig goes into the file's metadata: without it `load_lora_weights` takes
    lora_alpha = rank, and a run with `train.lora_alpha` != `train.lora_rank` loads mis-scaled.
    The UNet's adapter stays in PEFT's key format: converted to the old diffusers format, only
    the attention layers change names, and `load_lora_weights` then dropped them beside the
    PEFT-named keys of other `train.lora_targets` (proj_in, ff.net.2, ...).
    """
    family = family_of(config)
    denoiser = family.denoiser_part  # unet, or the transformer of sd3 and flux
    if not in_diffusers_format(config.train):  # LoKr, LoHa: PEFT's format (sdflow.models.adapters)
        modules = {denoiser: unet}
        if text_encoder is not None:
            names = ("text_encoder", "text_encoder_2")
            modules |= dict(zip(names, family.text_modules(text_encoder), strict=False))
        with atomic_dir(out_dir) as tmp:
            save_peft_adapters(Path(tmp), modules)
        return out_dir.name
    parts: dict[str, Any] = {
        f"{denoiser}_lora_layers": get_peft_model_state_dict(unet),
        f"{denoiser}_lora_adapter_metadata": unet.peft_config["default"].to_dict(),
    }
    encoders = family.text_modules(text_encoder) if text_encoder is not None else []
    for name, encoder in zip(("text_encoder", "text_encoder_2"), encoders, strict=False):
        layers = get_peft_model_state_dict(encoder)
        parts[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(layers)
        parts[f"{name}_lora_adapter_metadata"] = encoder.peft_config["default"].to_dict()
    with atomic_dir(out_dir) as tmp:
        family.pipeline_class.save_lora_weights(tmp, safe_serialization=True, **parts)
        canonical_safetensors(Path(tmp) / LORA_WEIGHTS)  # the same bytes at every save
    return out_dir.name


def write_cards(
    config: RunConfig, upstream: dict, out: Path, files: dict[str, str], summary: TrainSummary
) -> None:
    """A Hugging Face model card (README.md) in each exported model directory."""
    family, train = family_of(config), config.train
    kind = "lora" if train.mode == "lora" else "pipeline"
    latents = upstream.get("latents") or {}
    training = {
        "mode": train.mode, "steps": summary.steps, "lr": train.lr,
        "batch size (per process)": train.batch_size, "processes": resolve_processes(train),
        "resolution": config.download.resolution,
        "buckets": latents.get("info", {}).get("buckets", "none"),
        "training samples": latents.get("counts", {}).get("encoded"),
        "text encoder": train.text_encoder,
    }  # fmt: skip
    if kind == "lora":
        training |= {
            "lora rank": train.lora_rank,
            "lora alpha": train.lora_alpha or train.lora_rank,
        }
    images = {"training loss": out / LOSS_CURVE}
    if files.get("validation_grid"):
        images["validation grid"] = out / files["validation_grid"]
    base = config.model.pretrained if config.model.init == "pretrained" else None
    for prefix in ("", "final_"):
        model = files.get(prefix + kind)
        if not model or (prefix and model == files[kind]):
            continue
        exports = {n: files[prefix + n] for n in EXPORT_FILES if prefix + n in files}
        facts = CardFacts(
            family.name, kind, family.pipeline_class.__name__, base, bool(base and is_hub_name(base)),
            training, (summary.validation or {}).get("curve") or [], exports, images,
        )  # fmt: skip
        write_card(out / model, facts, base_license(base))


def drop_optimizer_state(checkpoints: Path, step: int, keep: int) -> None:
    """Rewrite the kept checkpoint without the optimizer moments (`train.keep_optimizer_state`).

    Rewritten as a new checkpoint of the same step, so a crash keeps either the old or the new one.
    """
    _, values = load_checkpoint(checkpoints / step_name(step))
    values.pop("optimizer", None)
    save_checkpoint(checkpoints, step, values, keep=keep)


def _info(
    config: RunConfig,
    sources: ComponentSources,
    summary: TrainSummary,
    scheduler: DDPMScheduler,
) -> dict[str, Any]:
    mode = "scratch" if sources.unet is None else config.train.mode
    base = base_scheduler_config(config, sources)
    return {
        "final_loss": summary.final_loss,
        "mode": mode,
        "text_encoder": config.train.text_encoder,
        "prediction_type": scheduler.config.get("prediction_type", "flow"),  # flow: sd3, flux
        "base_prediction_type": base.get("prediction_type", "epsilon") if base else None,
        "skipped_steps": summary.skipped_steps,
        "optimizer_state_kept": config.train.keep_optimizer_state,
        "samples_per_second": round(summary.samples_per_second, 3),
        "base_model": config.model.pretrained,
        "base_commit": hub_commit(config.model),  # what a hub name resolved to for this run
        "resumed_from_step": summary.resumed_from,
        "processes": resolve_processes(config.train),
        "tf32": summary.tf32,  # train.tf32 applied (CUDA only)
    }


def _buckets(config: RunConfig, upstream: dict[str, Manifest | None]) -> dict[str, Any]:
    """Per bucket of the cached latents: samples, batches per epoch and the smaller last batch a
    bucket ends in when its count is not a multiple of `train.batch_size` (kept, not dropped)."""
    latents = upstream.get("latents") if config.train.cache_latents else None
    counts = (latents or {}).get("info", {}).get("buckets")
    return {"buckets": bucket_plan(counts, config.train.batch_size)} if counts else {}
