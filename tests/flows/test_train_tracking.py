"""What a run records of a train stage with validation: summary.json entries and UI artifacts."""

from __future__ import annotations

from pathlib import Path

from flows.tracking import RunTracker
from sdflow.ops import artifacts

VALIDATION = {
    "every": 10,
    "curve": [[10, 0.5], [20, 0.31234567], [30, 0.4]],
    "best_step": 20,
    "best_loss": 0.31234567,
    "stopped_early_at": 30,
    "grid": "logs/validation/step-000030.png",
}


def train_manifest(files: dict) -> dict:
    return {
        "stage": "train",
        "path": "stages/train/k",
        "files": files,
        "info": {"validation": VALIDATION},
    }


def tracker(workdir: Path) -> RunTracker:
    run = RunTracker.__new__(RunTracker)  # the bookkeeping only: no flow run, no Prefect server
    run.workdir, run.summary = str(workdir), {"profile": "tiny-test", "stages": {}}
    return run


def test_summary_names_the_best_and_the_last_model_and_the_curve(tmp_path):
    run = tracker(tmp_path)
    files = {"pipeline": "pipeline", "final_pipeline": "final-pipeline"}
    run._note_products("train", train_manifest(files))
    base = tmp_path / "stages" / "train" / "k"
    assert run.summary["model_dir"] == str(base / "pipeline")
    assert run.summary["final_model_dir"] == str(base / "final-pipeline")
    assert run.summary["validation"]["best_step"] == 20
    # without train.keep_best both name the one exported model
    run._note_products("train", {"path": "stages/train/k", "files": {"lora": "lora"}})
    assert run.summary["model_dir"] == run.summary["final_model_dir"] == str(base / "lora")


def test_ui_shows_the_validation_table_and_the_newest_grid(tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr(artifacts, "publish_image", lambda *a: shown.append(("image", a[1], a[2])))
    monkeypatch.setattr(artifacts, "publish_validation", lambda *a: shown.append(("table", a[1])))
    files = {"loss_curve": "loss.png", "validation_grid": VALIDATION["grid"]}
    tracker(tmp_path)._show("train", train_manifest(files))
    base = tmp_path / "stages" / "train" / "k"
    assert shown == [
        ("image", "loss-curve", base / "loss.png"),
        ("table", VALIDATION),
        ("image", "validation-grid", base / VALIDATION["grid"]),
    ]
    assert artifacts.validation_rows(VALIDATION) == [
        {"step": 10, "validation_loss": 0.5, "best": False},
        {"step": 20, "validation_loss": 0.3123, "best": True},
        {"step": 30, "validation_loss": 0.4, "best": False},
    ]
