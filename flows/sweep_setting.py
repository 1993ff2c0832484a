"""One setting of a sweep: a pipeline subflow, and what it produced.

Its own module, imported by its package path, so that a sweep that trains settings in parallel can
run `setting_task` in worker processes: they import it from here by name (a flow file a Prefect
worker loads by its path is not importable under that name in another process).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.pipeline import pipeline
from sdflow.ops import sweeps


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
    run_dir = run_dir_of(Path(workdir).resolve(), str(state.state_details.flow_run_id or ""))
    if run_dir is not None:
        result |= _outcome(run_dir, json.loads((run_dir / "summary.json").read_text()))
    return result


# The setting in a worker process of the sweep (no cache: the pipeline's stages are the cache).
setting_task = task(run_setting, name="sweep-setting", cache_policy=NO_CACHE, persist_result=False)


def run_dir_of(workdir: Path, flow_run_id: str) -> Path | None:
    """The run directory of pipeline run `flow_run_id` (its name ends with the id's first 8)."""
    found = sorted((workdir / "runs").glob(f"*-{flow_run_id[:8]}/summary.json"))
    return found[-1].parent if found and flow_run_id else None


def _outcome(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    stages = summary.get("stages", {})
    metrics_json = summary.get("metrics") or {}
    trained = metrics_json.get("trained") or {}
    metrics = {k: v for k, v in trained.items() if isinstance(v, int | float)}
    validation = _train_info(stages).get("validation") or {}
    if isinstance(validation.get("best_loss"), int | float):
        metrics["val_loss"] = validation["best_loss"]  # the lowest held-out loss of the run
    return {
        "run_dir": str(run_dir),
        "metrics": metrics,
        "model_dir": _scored_model_dir(summary, metrics_json),
        "train_seconds": (stages.get("train") or {}).get("seconds"),
        "cached": {name: stage.get("cached") for name, stage in stages.items()},
        "outputs": {name: stage.get("output") for name, stage in stages.items()},
    }


def _scored_model_dir(summary: dict[str, Any], metrics: dict[str, Any]) -> str | None:
    """The model directory the metrics belong to (`eval.checkpoints`: the last step's or the
    best's), else the run's exported model."""
    train = (summary.get("stages", {}).get("train") or {}).get("output")
    scored = (metrics.get("trained_model") or {}).get("path")
    return str(Path(train) / scored) if train and scored else summary.get("model_dir")


def _train_info(stages: dict[str, Any]) -> dict[str, Any]:
    output = (stages.get("train") or {}).get("output")
    manifest = Path(output) / "MANIFEST.json" if output else None
    return (
        json.loads(manifest.read_text()).get("info", {}) if manifest and manifest.is_file() else {}
    )
