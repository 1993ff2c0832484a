"""The sdflow pipeline: one Prefect flow whose body is the list of stages.

Run it with `sdflow run tiny-cpu` (cached stages come back at once) or
`sdflow run tiny-cpu --only filter` (one stage, upstream outputs from cache).

The stages run one after another in the flow's thread. Inside a data stage (download, filter,
caption) each shard is a task on the runner the profile's `runner` section selects: a thread pool of
`runner.max_workers`, or the Dask cluster at `runner.dask_address` (`sdflow.orchestration`). The
runner comes from the profile loaded in the body, so `sdflow run`, a deployment and a retried run
all use it; the flow's own task runner is not involved.
"""

from __future__ import annotations

from prefect import flow

from flows.tracking import RunTracker
from sdflow.memory import check_memory_options
from sdflow.profiles import load_profile
from tasks.autoencoder import train_autoencoder_task
from tasks.caption import caption_task
from tasks.download import download_task
from tasks.evaluate import evaluate_task
from tasks.filter import filter_task
from tasks.latents import cache_latents_task
from tasks.train import train_task


@flow(name="sdflow-pipeline", persist_result=True, result_serializer="json", log_prints=True)
def pipeline(
    profile: str = "tiny-cpu",
    overrides: list[str] | None = None,
    workdir: str = "./sdflow-work",
    only: list[str] | None = None,
    refresh: list[str] | None = None,
) -> str:
    """download → filter → caption → (autoencoder) → latents → train → evaluate; returns the run dir."""
    config = load_profile(profile, overrides or [])
    if not only or "train" in only:  # e.g. 8-bit AdamW on a host without CUDA: before any stage
        check_memory_options(config.train)
    run = RunTracker(config, profile, workdir, only, refresh)

    images = run.stage(download_task)
    kept = run.stage(filter_task, download=images)
    captioned = run.stage(caption_task, filter=kept)
    vae = (
        run.stage(train_autoencoder_task, caption=captioned) if config.needs_autoencoder() else None
    )
    latents = run.stage(cache_latents_task, caption=captioned, autoencoder=vae)
    model = run.stage(train_task, caption=captioned, autoencoder=vae, latents=latents)
    run.stage(evaluate_task, train=model, caption=captioned)

    return run.finish()
