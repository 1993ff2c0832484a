"""The sweep flow: one pipeline run per setting, sharing every stage the settings do not change.

    sdflow sweep tiny-cpu --grid train.lr=1e-3,3e-4 --grid train.lora_rank=4,16 --metric fid

Each setting runs the pipeline flow as a subflow (its own run directory, summary.json and UI
artifacts); the stage cache makes the data and latents stages of the later settings cache hits, and
a rerun of the sweep a run of cache hits. A setting that fails is recorded with its error and the
others go on. The sweep writes `WORKDIR/sweeps/<sweep-id>/summary.json` and a comparison table
artifact, and names the best setting by `metric` in its right direction (`sdflow.sweeps`).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.pipeline import pipeline
from sdflow import artifacts, sweeps
from sdflow.stageio import write_json


@flow(name="sdflow-sweep", persist_result=True, result_serializer="json", log_prints=True)
def sweep(
    profile: str = "tiny-cpu",
    grid: dict[str, list[str]] | None = None,
    metric: str = "fid",
    overrides: list[str] | None = None,
    workdir: str = "./sdflow-work",
    random: int | None = None,
    seed: int = 0,
) -> str:
    """Run every setting of `grid` (or `random` draws from it); returns the sweep's summary path."""
    overrides = list(overrides or [])
    settings = sweeps.plan(profile, grid or {}, metric, overrides, random, seed)
    sweep_dir = (
        Path(workdir).resolve() / "sweeps" / sweeps.sweep_id(profile, overrides, settings, metric)
    )
    results = [run_setting(profile, overrides, setting, workdir) for setting in settings]
    summary = summarize(profile, metric, grid or {}, results)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(sweep_dir / "summary.json", summary, sort_keys=False)
    artifacts.publish_sweep(profile, summary)
    get_run_logger().info("sweep %s: best %s", sweep_dir.name, summary["best"])
    return str(sweep_dir / "summary.json")


def run_setting(profile: str, overrides: list[str], setting: dict, workdir: str) -> dict[str, Any]:
    """One setting as a pipeline subflow; its outcome, also when it failed."""
    state = pipeline(
        profile=profile,
        overrides=[*overrides, *sweeps.overrides_of(setting)],
        workdir=workdir,
        return_state=True,
    )
    result: dict[str, Any] = {"setting": setting, "status": "completed"}
    if not state.is_completed():
        result |= {"status": "failed", "error": str(state.result(raise_on_failure=False))}
    run_dir = _run_dir(Path(workdir).resolve(), str(state.state_details.flow_run_id or ""))
    if run_dir is not None:
        result |= _outcome(run_dir, json.loads((run_dir / "summary.json").read_text()))
    return result


def _run_dir(workdir: Path, flow_run_id: str) -> Path | None:
    """The run directory of pipeline run `flow_run_id` (its name ends with the id's first 8)."""
    found = sorted((workdir / "runs").glob(f"*-{flow_run_id[:8]}/summary.json"))
    return found[-1].parent if found and flow_run_id else None


def _outcome(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    stages = summary.get("stages", {})
    trained = (summary.get("metrics") or {}).get("trained") or {}
    metrics = {k: v for k, v in trained.items() if isinstance(v, int | float)}
    validation = _train_info(stages).get("validation") or {}
    if isinstance(validation.get("best_loss"), int | float):
        metrics["val_loss"] = validation["best_loss"]  # the lowest held-out loss of the run
    return {
        "run_dir": str(run_dir),
        "metrics": metrics,
        "model_dir": summary.get("model_dir"),
        "train_seconds": (stages.get("train") or {}).get("seconds"),
        "cached": {name: stage.get("cached") for name, stage in stages.items()},
        "outputs": {name: stage.get("output") for name, stage in stages.items()},
    }


def _train_info(stages: dict[str, Any]) -> dict[str, Any]:
    output = (stages.get("train") or {}).get("output")
    manifest = Path(output) / "MANIFEST.json" if output else None
    return (
        json.loads(manifest.read_text()).get("info", {}) if manifest and manifest.is_file() else {}
    )


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
