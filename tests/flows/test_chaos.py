"""Chaos: `sdflow run` killed with SIGKILL (its whole process group) at random moments.

After the kills a plain rerun completes and equals an uninterrupted run: the same stage
fingerprints, bitwise the same UNet, no stage directory without its manifest, no debris. And a stage
killed and resumed inside itself keeps its fingerprint, so everything downstream stays cached.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdflow.config import STAGES
from sdflow.store.stageio import MANIFEST

SEED = 20261130
KILLS = 3
# Smaller than tiny-test where it does not matter, so six runs fit the test budget.
SMALLER = ["autoencoder.steps=12", "autoencoder.checkpoint_every=4", "train.max_steps=8"]
SMALLER += ["eval.num_prompts=2", "eval.fid_samples=4"]


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


def kill_after(workdir: Path, source: Path, env, seconds: float, *extra: str) -> None:
    """Start a run and SIGKILL its process group after `seconds` (or when it ends first)."""
    workdir.mkdir(exist_ok=True)
    child = launch(workdir, source, env, *extra)
    try:
        child.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def kill_when(workdir: Path, source: Path, env, ready, *extra: str) -> None:
    """Start a run and SIGKILL its process group as soon as `ready()` holds."""
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


def _tail(workdir: Path) -> str:
    return (workdir.parent / f"{workdir.name}.log").read_bytes()[-3000:].decode(errors="replace")


@pytest.mark.slow
def test_kill_9_at_random_moments_then_a_rerun_equals_an_uninterrupted_run(
    run_env, demo_folder, tmp_path
):
    started = time.monotonic()
    clean = complete(tmp_path / "clean", demo_folder, run_env)
    duration = time.monotonic() - started

    chaos = tmp_path / "chaos"
    rng = random.Random(SEED)
    for _ in range(KILLS):  # each rerun resumes, so later kills land in later stages
        kill_after(chaos, demo_folder, run_env, rng.uniform(0.3, 0.8) * duration)
    resumed = complete(chaos, demo_folder, run_env)

    assert resumed["status"] == "completed"
    want, got = manifests(tmp_path / "clean", clean), manifests(chaos, resumed)
    assert list(got) == list(STAGES)
    assert {s: m["fingerprint"] for s, m in got.items()} == {
        s: m["fingerprint"] for s, m in want.items()
    }
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (Path(resumed["model_dir"]) / unet).read_bytes() == (
        Path(clean["model_dir"]) / unet
    ).read_bytes()
    assert_clean(chaos)

    # the autoencoder killed after a checkpoint, then resumed: nothing downstream is rebuilt
    partials = chaos / "stages" / "autoencoder"
    at_step_8 = lambda: any(partials.glob(".*.partial/checkpoints/step-000008"))  # noqa: E731
    kill_when(chaos, demo_folder, run_env, at_step_8, "--refresh", "autoencoder")
    again = complete(chaos, demo_folder, run_env)
    cached = {name: stage["cached"] for name, stage in again["stages"].items()}
    assert cached == {**{s: True for s in STAGES}, "autoencoder": False}
    assert (
        manifests(chaos, again)["autoencoder"]["fingerprint"] == want["autoencoder"]["fingerprint"]
    )
    assert_clean(chaos)
