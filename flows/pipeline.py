"""The sdflow pipeline: one Prefect flow whose body is the list of stages.

Run it with `sdflow run tiny-cpu` (cached stages come back at once) or
`sdflow run tiny-cpu --only filter` (one stage, upstream outputs from cache).

The stages run one after another in the flow's thread. Inside a data stage (download, filter,
caption) each shard is a task on the runner the profile's `runner` section selects: a thread pool of
`runner.max_workers`, or the Dask cluster at `runner.dask_address` (`sdflow.ops.orchestration`). The
runner comes from the profile loaded in the body, so `sdflow run`, a deployment and a retried run
all use it; the flow's own task runner is not involved.

Each stage's module is imported when the flow reaches that stage (`stage_task`), not when this
module loads: torch, diffusers and transformers take seconds to import, and the download and filter
stages need none of them, so a run starts working as soon as Prefect is up.
"""

from __future__ import annotations

import importlib

from prefect import Task, flow

from flows.tracking import RunTracker
from sdflow.config import RunConfig
from sdflow.config.subsets import subset_view
from sdflow.models.formats.preflight import check_model_files
from sdflow.ops.results import PLAIN_JSON
from sdflow.profiles import load_profile

# stage -> (module, task attribute); imported on first use
STAGE_TASKS = {
    "download": ("tasks.download", "download_task"),
    "filter": ("tasks.filter", "filter_task"),
    "caption": ("tasks.caption", "caption_task"),
    "subsets": ("tasks.subsets", "join_subsets_task"),
    "autoencoder": ("tasks.autoencoder", "train_autoencoder_task"),
    "class_images": ("tasks.class_images", "class_images_task"),
    "latents": ("tasks.latents", "cache_latents_task"),
    "train": ("tasks.train", "train_task"),
    "evaluate": ("tasks.evaluate", "evaluate_task"),
}


def check_optimizer_options(train) -> None:
    """An optimizer this host cannot run (8-bit AdamW without CUDA, Prodigy without its package)
    stops the run before any stage; torch is imported for the check only when one is set."""
    if train.optimizer != "adamw":
        from sdflow.training.optimizers import check_optimizer

        check_optimizer(train)


def check_family_options(config) -> None:
    """Options a model family refuses (SDXL: `train.cache_latents: false`) stop the run
    before any stage; the family is looked up (model_index.json) only when such an option is set."""
    if config.model.init == "pretrained" and not config.train.cache_latents:
        from sdflow.models.families import family_of

        family_of(config).check(config)
    if config.model.quantize != "none":  # e.g. nf4 without CUDA, torchao not installed
        from sdflow.models.quantize import check_quantize

        check_quantize(config)


def single_file_base(config, workdir: str):
    """A single-file `model.pretrained` (a .safetensors checkpoint) converted once into a diffusers
    folder that every stage reads (`sdflow.models.formats.single_file`); torch is imported only then."""
    from sdflow.config.model import CHECKPOINT_SUFFIXES

    if config.model.init != "pretrained" or not config.model.pretrained.endswith(
        CHECKPOINT_SUFFIXES
    ):
        return config
    from sdflow.models.formats.single_file_base import resolve_single_file_base

    return resolve_single_file_base(config, workdir)


def stage_task(stage: str) -> Task:
    """The Prefect task of `stage`, its module imported now (see the module docstring)."""
    module, attribute = STAGE_TASKS[stage]
    return getattr(importlib.import_module(module), attribute)


@flow(name="sdflow-pipeline", persist_result=True, result_serializer=PLAIN_JSON, log_prints=True)
def pipeline(
    profile: str = "tiny-cpu",
    overrides: list[str] | None = None,
    workdir: str = "./sdflow-work",
    only: list[str] | None = None,
    refresh: list[str] | None = None,
) -> str:
    """download → filter → caption → (autoencoder) → (class_images) → latents → train →
    evaluate; returns the run dir."""
    config = load_profile(profile, overrides or [])
    check_model_files(config, only)  # a LoRA that does not fit the base: before any work
    config = single_file_base(config, workdir)
    if not only or "train" in only:  # e.g. 8-bit AdamW on a host without CUDA: before any stage
        check_optimizer_options(config.train)
        check_family_options(config)
    run = RunTracker(config, profile, workdir, only, refresh)

    if config.subsets:  # each subset's data stages on their own keys, then one training set
        captioned = run_subsets(run, config)
    else:
        images = run_stage(run, "download")
        kept = run_stage(run, "filter", download=images)
        captioned = run_stage(run, "caption", filter=kept)
    vae = run_stage(run, "autoencoder", caption=captioned) if config.needs_autoencoder() else None
    prior = run_stage(run, "class_images") if config.train.prior_preservation else None
    latents = run_stage(run, "latents", caption=captioned, autoencoder=vae)
    upstream = {"caption": captioned, "autoencoder": vae, "latents": latents}
    model = run_stage(run, "train", **upstream, class_images=prior)
    run_stage(run, "evaluate", train=model, caption=captioned)

    return run.finish()


def run_stage(run: RunTracker, stage: str, **upstream):
    """Run or look up `stage`; one --only leaves out entirely is not even imported."""
    return run.stage(stage_task(stage), **upstream) if run.needed(stage) else run.skip(stage)


def run_subsets(run: RunTracker, config: RunConfig):
    """download[NAME] → filter[NAME] → caption[NAME] per subset (its own source and caption
    settings), then the subsets stage joins their captioned samples (`tasks.subsets`)."""
    captions = {}
    for subset in config.subsets:
        view, name = subset_view(config, subset), subset.name
        images = run.stage(stage_task("download"), view, name)
        kept = run.stage(stage_task("filter"), view, name, download=images)
        captions[f"caption[{name}]"] = run.stage(stage_task("caption"), view, name, filter=kept)
    return run_stage(run, "subsets", **captions)
