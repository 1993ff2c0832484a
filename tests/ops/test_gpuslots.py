"""GPU slots without a server: which stages take one, and what a launched process is shown.

The slots themselves (waiting, binding, CUDA_VISIBLE_DEVICES) are tested against a real server in
tests/flows/test_gpu_slots.py.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest

from sdflow.ops import gpuslots
from sdflow.ops.orchestration import stage_gpu_slot
from sdflow.profiles import load_profile


@pytest.mark.parametrize(
    ("stage", "backend", "takes_slot"),
    [("train", "keep", True), ("latents", "keep", True), ("caption", "blip", True),
     ("caption", "clip-interrogator", True), ("caption", "keep", False), ("filter", "blip", False)],
)  # fmt: skip
def test_gpu_stages_and_model_captioning_take_a_device_slot(stage, backend, takes_slot):
    config = load_profile("tiny-test", [f"caption.backend={backend}"])
    assert (not isinstance(stage_gpu_slot(stage, config), nullcontext)) == takes_slot


def test_outside_a_prefect_run_there_is_no_slot_and_no_api_call(monkeypatch):
    def no_api():
        raise AssertionError("must not ask the server")

    monkeypatch.setattr(gpuslots, "device_limits", no_api)
    with gpuslots.gpu_slot() as device:
        assert device is None
    assert gpuslots.child_visible_devices({}) is None
    assert str(gpuslots.torch_device()) in ("cpu", "cuda")


def test_a_slot_is_the_nth_device_this_process_sees(monkeypatch):
    monkeypatch.setattr(gpuslots, "_held", [1])
    assert gpuslots.child_visible_devices({}) == "1"
    assert gpuslots.child_visible_devices({"CUDA_VISIBLE_DEVICES": "4,6"}) == "6"


@pytest.mark.parametrize("visible", [0, 1, 4])
def test_a_slot_holder_uses_one_gpu_of_those_it_sees(monkeypatch, visible):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)  # a host with `visible` GPUs
    monkeypatch.setattr(gpuslots, "_held", [])
    assert gpuslots.gpu_count() == visible  # no slot: every visible GPU
    monkeypatch.setattr(gpuslots, "_held", [0])
    assert gpuslots.gpu_count() == min(visible, 1)  # in a slot: its one GPU (none on a CPU host)


def test_training_in_a_slot_refuses_more_processes_than_its_one_gpu(monkeypatch, tmp_path):
    from sdflow.config import TrainConfig
    from sdflow.errors import UserError
    from sdflow.training import processes as training

    monkeypatch.setattr(gpuslots, "_held", [0])
    monkeypatch.setattr(training, "gpu_count", lambda: 1)  # a GPU host, seen from inside the slot
    with pytest.raises(
        UserError,
        match=r"train.processes is 2 \(2\) on 1 local node\(s\), 2 workers, but its GPU slot gives",
    ):
        training.worker_env(TrainConfig(processes=2), 2)
    with pytest.raises(UserError, match=r"on 2 local node\(s\), 2 workers, but its GPU slot"):
        training.worker_env(TrainConfig(processes=1, nodes=2), 1)
    assert training.worker_env(TrainConfig(processes=1), 1) == {}  # on the GPU: no gloo settings
