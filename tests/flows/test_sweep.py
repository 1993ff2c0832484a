"""`sdflow sweep` end to end on tiny-test: shared upstream stages, a table, the best setting."""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from sdflow.cli import main

UPSTREAM = ["download", "filter", "caption", "autoencoder", "latents"]
FAST = ["--set", "train.max_steps=4", "--set", "eval.num_prompts=2", "--set", "eval.fid_samples=4"]
GRID = ["--grid", "train.lr=1e-3,3e-3", "--grid", "train.ema=true,false"]


@pytest.fixture(scope="module", autouse=True)
def one_thread_everywhere():
    """One torch thread in this process and in the sweep's worker processes (they read
    OMP_NUM_THREADS at start-up): the same CPU kernels, so a setting trained in a worker is
    bitwise the one trained here, whatever thread count earlier modules of this process left."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = env


def fingerprint(setting: dict, stage: str) -> str:
    manifest = Path(setting["outputs"][stage]) / "MANIFEST.json"
    return json.loads(manifest.read_text())["fingerprint"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One workdir for the module: the second sweep finds the first one's stages."""
    return tmp_path_factory.mktemp("sweeps")


def sweep(workdir: Path, source: Path, *args: str) -> dict:
    before = set((workdir / "sweeps").glob("*/summary.json"))
    common = ["--workdir", str(workdir), "--set", f"source.path={source}", *FAST]
    assert main(["sweep", "tiny-test", *common, *args]) == 0
    after = set((workdir / "sweeps").glob("*/summary.json"))
    (path,) = (after - before) or after  # a rerun rewrites the same sweep's summary
    return json.loads(path.read_text())


def train_window(setting: dict) -> tuple[float, float]:
    """When the setting's train stage was built: (end - its seconds, end), the end being when its
    MANIFEST.json was written (last, as the stage finished)."""
    manifest = Path(setting["outputs"]["train"]) / "MANIFEST.json"
    end = manifest.stat().st_mtime
    return end - json.loads(manifest.read_text())["seconds"], end


def run_window(setting: dict) -> tuple[float, float]:
    """When the setting's pipeline run worked: its summary's (started_at, finished_at)."""
    summary = json.loads((Path(setting["run_dir"]) / "summary.json").read_text())
    return tuple(
        datetime.fromisoformat(summary[k]).timestamp() for k in ("started_at", "finished_at")
    )


@pytest.fixture(scope="module")
def grid_sweep(prefect_server, demo_folder, workdir) -> dict:
    """The 2x2 sweep, with the default parallelism of a CPU host: one setting after another."""
    return sweep(workdir, demo_folder, *GRID, "--metric", "fid")


@pytest.mark.slow
def test_a_2x2_sweep_shares_upstream_stages_and_names_the_best(demo_folder, workdir, grid_sweep):
    summary = grid_sweep
    settings = summary["settings"]
    assert [s["setting"] for s in settings] == [
        {"train.lr": "1e-3", "train.ema": "true"},
        {"train.lr": "1e-3", "train.ema": "false"},
        {"train.lr": "3e-3", "train.ema": "true"},
        {"train.lr": "3e-3", "train.ema": "false"},
    ]
    assert all(s["status"] == "completed" for s in settings)
    # the data, autoencoder and latents stages ran once; the other settings found them cached
    assert [any(s["cached"][stage] for stage in UPSTREAM) for s in settings] == [
        False,
        True,
        True,
        True,
    ]
    assert all(all(s["cached"][stage] for stage in UPSTREAM) for s in settings[1:])
    # no GPU slots, no CUDA: the settings trained one after another
    assert summary["parallel"] == 1 and summary["upstream"] is None
    windows = [train_window(s) for s in settings]
    assert all(end <= start for (_, end), (start, _) in pairwise(windows))
    assert len({s["outputs"]["latents"] for s in settings}) == 1
    models = {s["model_dir"] for s in settings}
    assert len(models) == 4 and all(Path(m, "model_index.json").is_file() for m in models)
    StableDiffusionPipeline.from_pretrained(settings[0]["model_dir"])

    fids = [s["metrics"]["fid"] for s in settings]
    assert summary["direction"] == "min" and summary["best"]["index"] == fids.index(min(fids))
    table = summary["table"]
    assert [row["best"] for row in table].count("★") == 1
    assert table[summary["best"]["index"]]["best"] == "★"
    assert [row["fid"] for row in table] == [round(f, 4) for f in fids]

    again = sweep(workdir, demo_folder, *GRID, "--metric", "fid")  # a rerun: all cached
    assert all(all(s["cached"].values()) for s in again["settings"])
    assert [s["metrics"] for s in again["settings"]] == [s["metrics"] for s in settings]


@pytest.mark.slow
def test_a_failing_setting_is_recorded_and_the_others_go_on(
    demo_folder, workdir, grid_sweep, tmp_path
):
    empty = tmp_path / "empty"
    empty.mkdir()
    grid = ["--grid", f"source.path={empty},{demo_folder}"]
    validated = ["--set", "train.validate_every=2", "--metric", "val_loss"]
    validated += ["--set", "train.keep_best=true", "--set", "eval.checkpoints=best"]
    summary = sweep(workdir, demo_folder, *grid, *validated)  # upstream: grid_sweep's stages
    failed, finished = summary["settings"]
    assert failed["status"] == "failed" and "No images found" in failed["error"]
    assert finished["status"] == "completed" and finished["cached"]["latents"]
    train = json.loads((Path(finished["outputs"]["train"]) / "MANIFEST.json").read_text())
    assert finished["metrics"]["val_loss"] == train["info"]["validation"]["best_loss"] > 0
    # eval.checkpoints: best scored the best checkpoint's model, the one the table names
    evaluate = json.loads((Path(finished["outputs"]["evaluate"]) / "MANIFEST.json").read_text())
    best = {"choice": "best", "path": "pipeline", "step": train["info"]["validation"]["best_step"]}
    assert evaluate["info"]["trained_model"] == best
    assert finished["model_dir"] == str(Path(finished["outputs"]["train"]) / "pipeline")
    assert summary["best"]["index"] == 1 and summary["table"][0]["model_dir"] == failed["error"]


@pytest.mark.slow
def test_parallel_settings_train_at_once_and_match_the_sequential_ones(
    demo_folder, workdir, grid_sweep, tmp_path
):
    """`--parallel 2` on a CPU host: two settings of the 2x2 grid, in a workdir holding only its
    stages before train, run at the same time on the shared upstream stages and reach the
    sequential ones' weights and metrics."""
    fresh = tmp_path / "work"
    for stage in UPSTREAM:
        shutil.copytree(workdir / "stages" / stage, fresh / "stages" / stage)
    grid = ["--grid", "train.lr=1e-3,3e-3", "--set", "train.ema=true"]
    summary = sweep(fresh, demo_folder, *grid, "--metric", "fid", "--parallel", "2")

    assert summary["parallel"] == 2 and summary["upstream"]["status"] == "Completed"
    settings = summary["settings"]
    assert [s["status"] for s in settings] == ["completed", "completed"]
    assert all(s["cached"]["latents"] and not s["cached"]["train"] for s in settings)
    # The two settings' runs overlapped in time. (Not their train stages alone: a tiny train takes
    # a few seconds, less than the gap between two worker processes' start-ups on a loaded host.)
    (start_a, end_a), (start_b, end_b) = (run_window(s) for s in settings)
    assert start_a < end_b and start_b < end_a
    # Each trained its own setting on the shared upstream, bitwise as the sequential sweep did
    sequential = [grid_sweep["settings"][i] for i in (0, 2)]  # train.ema true, lr 1e-3 and 3e-3
    for stage in ("train", "evaluate"):
        keys = [Path(s["outputs"][stage]).name for s in settings]
        assert keys == [Path(s["outputs"][stage]).name for s in sequential]
        assert [fingerprint(s, stage) for s in settings] == [
            fingerprint(s, stage) for s in sequential
        ]
    assert [s["metrics"] for s in settings] == [s["metrics"] for s in sequential]
