"""GPU slots against a real Prefect server: a slot is a device, and a second holder waits for it.

Two flow runs in two processes, each with a data stage and a GPU stage (tiny plain functions wrapped
by sdflow's own `stage_task`, so the tag, the device slot and `launch.supervise` are the real ones).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from sdflow.ops.deploy import ROOT, set_gpu_limit

pytestmark = pytest.mark.slow
# the devices the probe runs see (whatever this host has): slot i is the i-th of them
VISIBLE = "5,7"

# One flow run: a data stage and a GPU stage (`stage`) submitted together; the GPU stage launches a
# child process (as training does) and holds its slot until the test creates `release`.
PROBE = """
import json, logging, os, sys, time, uuid
from pathlib import Path
from prefect import flow
from prefect.runtime import flow_run
from sdflow.ops.gpuslots import held_device
from sdflow.ops.launch import supervise
from sdflow.ops.orchestration import stage_task
from sdflow.profiles import load_profile

out, stage = Path(sys.argv[1]), sys.argv[2]
run = uuid.uuid4().hex[:12]

def key(config, upstream):
    return run  # a new key per run: never a cache hit

def gpu_work(config, upstream, workdir):
    start = time.time()
    (out.parent / (out.name + ".holding")).touch()
    seen = []
    probe = "import os; print('CVD=' + str(os.environ.get('CUDA_VISIBLE_DEVICES')))"
    supervise([sys.executable, "-c", probe], logging.getLogger("probe"), on_line=seen.append)
    release = out.parent / "release"
    while not release.exists():  # the test says when B has had its chance to collide
        time.sleep(0.1)
    time.sleep(0.5)
    cvd = [line.strip()[4:] for line in seen if line.strip().startswith("CVD=")]
    return {"device": held_device(), "child_cvd": cvd, "start": start, "end": time.time()}

def data_work(config, upstream, workdir):
    start = time.time()
    time.sleep(0.5)
    (out.parent / (out.name + ".data-done")).touch()
    return {"start": start, "end": time.time()}

gpu_task = stage_task(stage, key, retries=0)(gpu_work)
data_task = stage_task("filter", key, retries=0)(data_work)

@flow(name="gpu-slot-probe")
def probe_flow():
    config = load_profile("tiny-test", ["caption.backend=blip"])
    workdir = str(out.parent / "work")
    gpu = gpu_task.submit(config, {}, workdir)
    data = data_task.submit(config, {}, workdir)
    return {"flow_run": flow_run.get_id(), "gpu": gpu.result(), "data": data.result()}

out.write_text(json.dumps(probe_flow()))
"""


def _set_slots(served: Any, gpus: int) -> None:
    with temporary_settings({PREFECT_API_URL: f"{served.url}/api"}):
        set_gpu_limit(gpus)  # what `sdflow deploy --gpus N` does


def _two_runs(served: Any, tmp_path: Path, stage: str, both_hold: bool) -> list[dict]:
    """Run A; once its GPU stage holds a slot, run B; release A's slot once B has collided with it
    (B holds a slot too, or B's data stage is done). Returns both results, A first."""
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    command = [sys.executable, "-c", PROBE]
    env = {**served.env, "CUDA_VISIBLE_DEVICES": VISIBLE}
    runs = [subprocess.Popen([*command, str(outs[0]), stage], env=env, cwd=ROOT)]
    _wait_for(tmp_path / "a.json.holding", runs)
    runs.append(subprocess.Popen([*command, str(outs[1]), stage], env=env, cwd=ROOT))
    _wait_for(tmp_path / ("b.json.holding" if both_hold else "b.json.data-done"), runs)
    time.sleep(0 if both_hold else 2.0)  # B's GPU stage was submitted with its data stage
    (tmp_path / "release").touch()
    assert [run.wait(timeout=180) for run in runs] == [0, 0]
    return [json.loads(out.read_text()) for out in outs]


def _wait_for(marker: Path, runs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert all(r.poll() is None for r in runs), f"a probe run exited before {marker.name}"
        assert time.monotonic() < deadline, f"no {marker.name} after {timeout} s"
        time.sleep(0.1)


def _states(served: Any, flow_run_id: str, stage: str) -> dict[str, float]:
    """{state name: timestamp} of the flow run's `stage` task run, from its state history."""
    (run,) = [r for r in served.task_runs(flow_run_id) if r["name"].rsplit("-", 1)[0] == stage]
    assert run["state_type"] == "COMPLETED"
    history = served.api("GET", f"/task_run_states/?task_run_id={run['id']}")
    return {s["name"]: datetime.fromisoformat(s["timestamp"]).timestamp() for s in history}


def test_one_slot_the_second_gpu_stage_waits_and_its_data_stage_goes_ahead(bare_server, tmp_path):
    _set_slots(bare_server, 1)
    a, b = _two_runs(bare_server, tmp_path, "train", both_hold=False)
    assert b["gpu"]["start"] >= a["gpu"]["end"]  # never two holders of the one GPU at once
    assert b["data"]["end"] < a["gpu"]["end"]  # B's data stage did not wait for the GPU
    assert a["gpu"]["device"] == b["gpu"]["device"] == 0
    assert a["gpu"]["child_cvd"] == b["gpu"]["child_cvd"] == ["5"]  # the one slot: device 5 only

    first, second = (_states(bare_server, r["flow_run"], "train") for r in (a, b))
    # B's GPU task was submitted while A held the slot, and only ran once A's had completed.
    assert second["Pending"] < first["Completed"] <= second["Running"]


def test_device_slot_alone_serialises_a_gpu_caption_stage(bare_server, tmp_path):
    """caption with a model holds a device slot but not the `gpu` tag: the device limit waits."""
    _set_slots(bare_server, 1)
    a, b = _two_runs(bare_server, tmp_path, "caption", both_hold=False)
    assert b["gpu"]["start"] >= a["gpu"]["end"]
    assert a["gpu"]["device"] == b["gpu"]["device"] == 0
    first, second = (_states(bare_server, r["flow_run"], "caption") for r in (a, b))
    assert second["Running"] < first["Completed"]  # it ran, and waited inside for the device


def test_two_slots_bind_two_devices(bare_server, tmp_path):
    _set_slots(bare_server, 2)
    a, b = _two_runs(bare_server, tmp_path, "train", both_hold=True)
    assert b["gpu"]["start"] < a["gpu"]["end"]  # both held a GPU at the same time
    assert {a["gpu"]["device"], b["gpu"]["device"]} == {0, 1}
    assert sorted(a["gpu"]["child_cvd"] + b["gpu"]["child_cvd"]) == ["5", "7"]
    limits = bare_server.api("POST", "/v2/concurrency_limits/filter", json={})
    assert sorted(x["name"] for x in limits if x["name"].startswith("gpu-")) == ["gpu-0", "gpu-1"]
    _set_slots(bare_server, 1)  # a smaller deploy removes the extra device limit
    limits = bare_server.api("POST", "/v2/concurrency_limits/filter", json={})
    assert sorted(x["name"] for x in limits if x["name"].startswith("gpu-")) == ["gpu-0"]
