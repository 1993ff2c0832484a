"""Chaos: `sdflow run` killed with SIGKILL (its whole process group) inside its stages.

Each kill lands inside a stage (its partial directory holds finished work, its manifest is not
written): the latents stage after its first shards, the train stage after a checkpoint, the
autoencoder after a checkpoint. The reruns resume (the finished latent shards are kept as they are,
training restarts from the checkpoint's step, not 0) and the end equals an uninterrupted run: the
same stage fingerprints, bitwise the same UNet, no stage directory without its manifest, no debris.
A stage killed and resumed inside itself keeps its fingerprint, so everything downstream stays cached.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdflow.config import STAGES
from sdflow.store.stageio import MANIFEST

RUN_STAGES = [s for s in STAGES if s != "class_images"]  # tiny-test: no prior preservation

# Smaller than tiny-test where it does not matter, so six runs fit the test budget; latent shards
# of 16 rows (about 14 of them), so a kill after the first lands well inside the stage.
SMALLER = ["autoencoder.steps=12", "autoencoder.checkpoint_every=4", "train.max_steps=8"]
SMALLER += ["eval.num_prompts=2", "eval.fid_samples=4", "latents.shard_size=16"]


@pytest.fixture(scope="module")
def run_env(prefect_server) -> dict[str, str]:
    """The test server's API for the child processes (no ephemeral server to start per run)."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1"}


def launch(workdir: Path, source: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "sdflow.cli", "run", "tiny-test", "--workdir", str(workdir)]
    args += ["--set", f"source.path={source}", *(f"--set={s}" for s in SMALLER), *extra]
    log = open(workdir.parent / f"{workdir.name}.log", "ab")  # noqa: SIM115 (the child owns it)
    return subprocess.Popen(
        args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def complete(workdir: Path, source: Path, env: dict[str, str], *extra: str) -> dict:
    """A run to the end; its summary.json."""
    workdir.mkdir(exist_ok=True)
    before = set((workdir / "runs").glob("*"))
    assert launch(workdir, source, env, *extra).wait(timeout=900) == 0, _tail(workdir)
    (run_dir,) = set((workdir / "runs").glob("*")) - before
    return json.loads((run_dir / "summary.json").read_text())


def kill_when(workdir: Path, source: Path, env, ready, *extra: str) -> None:
    """Start a run and SIGKILL its process group as soon as `ready()` holds."""
    workdir.mkdir(exist_ok=True)
    child = launch(workdir, source, env, *extra)
    deadline = time.monotonic() + 600
    while not ready() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, "the run ended before the moment to kill it"
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()


def manifests(workdir: Path, summary: dict) -> dict[str, dict]:
    return {
        name: json.loads((Path(stage["output"]) / MANIFEST).read_text())
        for name, stage in summary["stages"].items()
        if stage.get("output")
    }


def assert_clean(workdir: Path) -> None:
    """Every stage directory has its manifest; no partial, temp or trash directory is left."""
    stages = workdir / "stages"
    for directory in stages.glob("*/[!.]*"):
        assert (directory / MANIFEST).is_file(), directory
    debris = [p for p in stages.rglob(".*") if not p.name.endswith(".lock")]
    assert debris == []


def killed_inside(workdir: Path, stage: str) -> Path:
    """The partial directory of `stage` after a kill; fails unless the kill landed inside it (the
    partial is there, the stage has no finished output yet)."""
    (partial,) = (workdir / "stages" / stage).glob(".*.partial")
    assert not (partial.with_name(partial.name[1:].removesuffix(".partial")) / MANIFEST).exists()
    return partial


def files_as_written(directory: Path, pattern: str) -> dict[str, tuple[int, int]]:
    """{name: (inode, mtime)} of the files matching `pattern`: unchanged only if never rewritten."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.glob(pattern)}


def new_log(workdir: Path, start: int) -> str:
    return (workdir.parent / f"{workdir.name}.log").read_bytes()[start:].decode(errors="replace")


def log_size(workdir: Path) -> int:
    log = workdir.parent / f"{workdir.name}.log"
    return log.stat().st_size if log.exists() else 0


def _tail(workdir: Path) -> str:
    return (workdir.parent / f"{workdir.name}.log").read_bytes()[-3000:].decode(errors="replace")


@pytest.mark.slow
def test_kills_inside_stages_resume_and_the_rerun_equals_an_uninterrupted_run(
    run_env, demo_folder, tmp_path
):
    clean = complete(tmp_path / "clean", demo_folder, run_env)
    chaos, stages = tmp_path / "chaos", tmp_path / "chaos" / "stages"

    # 1. killed in the latents stage once two of its shards are written
    shards = "latents-*.safetensors"
    two_shards = lambda: len(list((stages / "latents").glob(f".*.partial/{shards}"))) >= 2  # noqa: E731
    kill_when(chaos, demo_folder, run_env, two_shards)
    finished = files_as_written(killed_inside(chaos, "latents"), shards)
    assert len(finished) >= 2

    # 2. the rerun resumes the latents and is killed in training, after a checkpoint
    checkpoint = lambda: any((stages / "train").glob(".*.partial/checkpoints/step-*"))  # noqa: E731
    kill_when(chaos, demo_folder, run_env, checkpoint)
    steps = [
        int(p.name[5:]) for p in (killed_inside(chaos, "train") / "checkpoints").glob("step-*")
    ]
    (latents_dir,) = (stages / "latents").glob("[!.]*")
    kept = files_as_written(latents_dir, shards)
    assert {name: kept[name] for name in finished} == finished  # the finished shards not redone
    assert len(kept) > len(finished)

    # 3. the rerun resumes training from the newest checkpoint
    resumed = complete(chaos, demo_folder, run_env)
    assert resumed["status"] == "completed"
    want, got = manifests(tmp_path / "clean", clean), manifests(chaos, resumed)
    assert got["train"]["info"]["resumed_from_step"] == max(steps) > 0
    assert want["train"]["info"]["resumed_from_step"] == 0
    assert list(got) == RUN_STAGES
    assert {s: m["fingerprint"] for s, m in got.items()} == {
        s: m["fingerprint"] for s, m in want.items()
    }
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (Path(resumed["model_dir"]) / unet).read_bytes() == (
        Path(clean["model_dir"]) / unet
    ).read_bytes()
    assert_clean(chaos)

    # 4. the autoencoder killed after a checkpoint, then resumed: nothing downstream is rebuilt
    partials = stages / "autoencoder"
    at_step_8 = lambda: any(partials.glob(".*.partial/checkpoints/step-000008"))  # noqa: E731
    kill_when(chaos, demo_folder, run_env, at_step_8, "--refresh", "autoencoder")
    killed_inside(chaos, "autoencoder")
    start = log_size(chaos)
    again = complete(chaos, demo_folder, run_env)
    assert "Resuming autoencoder training from the checkpoint of step 8" in new_log(chaos, start)
    cached = {name: stage["cached"] for name, stage in again["stages"].items()}
    assert cached == {**{s: True for s in RUN_STAGES}, "autoencoder": False}
    assert (
        manifests(chaos, again)["autoencoder"]["fingerprint"] == want["autoencoder"]["fingerprint"]
    )
    assert_clean(chaos)
