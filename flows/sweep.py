"""The sweep flow: one pipeline run per setting, sharing every stage the settings do not change.

    sdflow sweep tiny-cpu --grid train.lr=1e-3,3e-4 --grid train.lora_rank=4,16 --metric fid

Each setting runs the pipeline flow as a subflow (its own run directory, summary.json and UI
artifacts); the stage cache makes the data and latents stages of the later settings cache hits, and
a rerun of the sweep a run of cache hits. A setting that fails is recorded with its error and the
others go on. The sweep writes `WORKDIR/sweeps/<sweep-id>/summary.json` and a comparison table
artifact, and names the best setting by `metric` in its right direction (`sdflow.ops.sweeps`).

Settings run one at a time, or `parallel` at once: by default one per GPU slot (the `gpu-<i>`
limits of `sdflow deploy --gpus N`) on a CUDA host, so one at a time on a CPU host. In parallel,
the first setting's stages before train are built first, once (`upstream` in the summary), then
each setting runs in a worker process of its own (`sweep-setting` task, its pipeline a subflow of
it): processes, not threads, since training holds process-wide state (the GPU slot it holds,
accelerate's state, seeded draws from torch's global generator). Two settings that need the same
missing stage still build it once: the stage lock (`sdflow.store.stageio`) makes the second wait for it.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ProcessPoolTaskRunner

from flows.pipeline import pipeline
from flows.sweep_setting import run_dir_of, run_setting, setting_task
from sdflow.config import STAGES
from sdflow.ops import artifacts, sweeps
from sdflow.ops.orchestration import shared_api
from sdflow.ops.results import PLAIN_JSON
from sdflow.store.stageio import write_json

# The pipeline's stages before train: built once, before the settings fan out.
UPSTREAM = list(STAGES[: STAGES.index("train")])


@flow(name="sdflow-sweep", persist_result=True, result_serializer=PLAIN_JSON, log_prints=True)
def sweep(
    profile: str = "tiny-cpu",
    grid: dict[str, list[str]] | None = None,
    metric: str = "fid",
    overrides: list[str] | None = None,
    workdir: str = "./sdflow-work",
    random: int | None = None,
    seed: int = 0,
    parallel: int | None = None,
) -> str:
    """Run every setting of `grid` (or `random` draws from it); returns the sweep's summary path.

    `parallel`: settings trained at once (default: one per GPU slot on a CUDA host, else 1)."""
    overrides = list(overrides or [])
    settings = sweeps.plan(profile, grid or {}, metric, overrides, random, seed)
    workers = min(len(settings), _parallelism(parallel))
    sweep_dir = (
        Path(workdir).resolve() / "sweeps" / sweeps.sweep_id(profile, overrides, settings, metric)
    )
    upstream = None
    if workers == 1:
        results = [run_setting(profile, overrides, setting, workdir) for setting in settings]
    else:
        upstream = build_upstream(profile, overrides, settings[0], workdir)
        results = run_in_parallel(profile, overrides, settings, workdir, workers)
    summary = summarize(profile, metric, grid or {}, results)
    summary.update(parallel=workers, upstream=upstream)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(sweep_dir / "summary.json", summary, sort_keys=False)
    artifacts.publish_sweep(profile, summary)
    get_run_logger().info("sweep %s: best %s", sweep_dir.name, summary["best"])
    return str(sweep_dir / "summary.json")


def _parallelism(parallel: int | None) -> int:
    if parallel is not None:
        return sweeps.parallelism(parallel, gpu_slots=0, cuda=False)
    import torch

    from sdflow.ops.gpuslots import device_limits

    return sweeps.parallelism(None, len(device_limits()), torch.cuda.is_available())


def build_upstream(profile: str, overrides: list[str], setting: dict, workdir: str) -> dict:
    """The first setting's stages before train, as a pipeline run of those stages alone."""
    state = pipeline(
        profile=profile,
        overrides=[*overrides, *sweeps.overrides_of(setting)],
        workdir=workdir,
        only=UPSTREAM,
        return_state=True,
    )
    run_dir = run_dir_of(Path(workdir).resolve(), str(state.state_details.flow_run_id or ""))
    if not state.is_completed():  # each setting meets (and records) the failure itself
        get_run_logger().warning("sweep: the shared stages failed: %s", state.message)
    return {"status": state.name, "run_dir": str(run_dir) if run_dir else None}


def run_in_parallel(
    profile: str, overrides: list[str], settings: list[dict], workdir: str, workers: int
) -> list[dict[str, Any]]:
    """Each setting in a worker process, `workers` at a time; a crashed worker is a failed setting."""
    results = []
    with shared_api(), ProcessPoolTaskRunner(max_workers=workers) as runner:
        futures = [
            runner.submit(
                setting_task,
                {"profile": profile, "overrides": overrides, "setting": s, "workdir": workdir},
            )
            for s in settings
        ]
        for setting, future in zip(settings, futures, strict=True):
            try:
                results.append(future.result())
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                results.append({"setting": setting, "status": "failed", "error": error})
    return results


def summarize(profile: str, metric: str, grid: dict, results: list[dict]) -> dict[str, Any]:
    best = sweeps.best_setting(results, metric)
    return {
        "profile": profile,
        "metric": metric,
        "direction": sweeps.DIRECTIONS[metric],
        "grid": grid,
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "best": None if best is None else {"index": best, **results[best]["setting"]},
        "settings": results,
        "table": sweeps.table_rows(results, best),
    }
