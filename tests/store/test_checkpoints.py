"""Crash-safe checkpoints: round trip without pickles, atomic pointer, fallbacks, keep-K."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from sdflow.store.checkpoints import (
    LATEST,
    CheckpointError,
    best_step,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    mark_best,
    prune_checkpoints,
    save_checkpoint,
    step_name,
)


def make_state(step: int) -> dict:
    """A state shaped like the trainer's: weights, optimizer, scheduler, RNG, plain values."""
    torch.manual_seed(step)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(step)
    return {
        "model": {k: v + step for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "rng": {"generator": generator.get_state(), "torch": torch.get_rng_state()},
        "progress": {"step": step, "losses": [0.5, 0.25], "name": None},
    }


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip_keeps_tensors_types_and_int_keys(tmp_path):
    state = make_state(3)
    path = save_checkpoint(tmp_path, 3, state, keep=2)
    step, loaded = load_checkpoint(path)
    assert step == 3
    assert_same(state["model"], loaded["model"])
    assert_same(state["optimizer"]["state"], loaded["optimizer"]["state"])
    assert list(loaded["optimizer"]["state"]) == [0, 1]  # int keys survive JSON
    assert loaded["progress"] == state["progress"]
    # The weights file is a plain state dict under the parameter names; nothing is pickled.
    assert set(load_file(path / "model.safetensors")) == {"weight", "bias"}
    assert sorted(p.name for p in path.iterdir()) == [
        "model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "state.json",
    ]
    # The optimizer restores from the loaded state.
    model = torch.nn.Linear(3, 2)
    torch.optim.AdamW(model.parameters(), lr=1e-3).load_state_dict(loaded["optimizer"])
    generator = torch.Generator()
    generator.set_state(loaded["rng"]["generator"])
    assert torch.equal(
        torch.randn(3, generator=generator),
        torch.randn(3, generator=torch.Generator().manual_seed(3)),
    )


def test_pointer_moves_and_keep_k_deletes_older(tmp_path):
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, step, make_state(step), keep=2)
        assert (tmp_path / LATEST).read_text().strip() == step_name(step)
    assert list_checkpoints(tmp_path) == [6, 8]
    assert load_latest(tmp_path)[0] == 8
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_half_written_tmp_dir_is_ignored_and_cleaned(tmp_path):
    save_checkpoint(tmp_path, 4, make_state(4), keep=2)
    # A crash while writing step 8: its files sit in the temporary directory, LATEST unchanged.
    tmp = tmp_path / f".tmp-{step_name(8)}"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\0" * 10)
    step, _ = load_latest(tmp_path)
    assert step == 4
    save_checkpoint(tmp_path, 8, make_state(8), keep=2)
    assert not tmp.exists()
    assert load_latest(tmp_path)[0] == 8


def test_pointer_to_missing_dir_falls_back_to_newest_complete(tmp_path):
    save_checkpoint(tmp_path, 4, make_state(4), keep=3)
    (tmp_path / LATEST).write_text(step_name(12) + "\n")
    assert load_latest(tmp_path)[0] == 4
    (tmp_path / LATEST).write_text("garbage")
    assert load_latest(tmp_path)[0] == 4


@pytest.mark.parametrize("damage", ["truncate", "no_state", "bad_json", "missing_file"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, damage):
    save_checkpoint(tmp_path, 4, make_state(4), keep=3)
    newest = save_checkpoint(tmp_path, 8, make_state(8), keep=3)
    weights = newest / "optimizer.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-7])
    elif damage == "no_state":
        (newest / "state.json").unlink()
    elif damage == "bad_json":
        (newest / "state.json").write_text("{not json")
    else:
        weights.unlink()
    step, state = load_latest(tmp_path)
    assert step == 4
    assert_same(state["model"], make_state(4)["model"])


def test_same_size_corruption_of_safetensors_header_is_detected(tmp_path):
    save_checkpoint(tmp_path, 4, make_state(4), keep=3)
    newest = save_checkpoint(tmp_path, 8, make_state(8), keep=3)
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff" * 8  # the JSON header is now invalid, the size unchanged
    weights.write_bytes(bytes(data))
    assert load_latest(tmp_path)[0] == 4


def test_no_checkpoint_gives_none(tmp_path):
    assert load_latest(tmp_path / "absent") is None
    assert load_latest(tmp_path) is None


def test_prune_never_deletes_the_pointed_checkpoint(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, make_state(step), keep=5)
    (tmp_path / LATEST).write_text(step_name(2))
    prune_checkpoints(tmp_path, keep=1)
    assert list_checkpoints(tmp_path) == [2, 6]


def test_the_best_checkpoint_survives_saves_and_prunes_until_another_is_marked(tmp_path):
    assert best_step(tmp_path) is None
    save_checkpoint(tmp_path, 2, make_state(2), keep=1)
    mark_best(tmp_path, 2)
    for step in (4, 6, 8):
        save_checkpoint(tmp_path, step, make_state(step), keep=1)
    assert list_checkpoints(tmp_path) == [2, 8] and best_step(tmp_path) == 2
    prune_checkpoints(tmp_path, keep=1)  # what the train stage does at the end, and `sdflow gc`
    assert list_checkpoints(tmp_path) == [2, 8]
    assert_same(load_checkpoint(tmp_path / step_name(2))[1], make_state(2))
    mark_best(tmp_path, 8)
    save_checkpoint(tmp_path, 10, make_state(10), keep=1)
    assert list_checkpoints(tmp_path) == [8, 10]
    with pytest.raises(CheckpointError, match="no checkpoint of step 3"):
        mark_best(tmp_path, 3)


def test_state_json_lists_sizes_hashes_and_step(tmp_path):
    path = save_checkpoint(tmp_path, 5, make_state(5), keep=1)
    meta = json.loads((path / "state.json").read_text())
    assert meta["step"] == 5
    weights = path / "model.safetensors"
    assert meta["files"]["model.safetensors"] == {
        "size": weights.stat().st_size,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }


def test_flipped_bits_in_the_tensor_data_fall_back_with_a_warning(tmp_path, caplog):
    save_checkpoint(tmp_path, 4, make_state(4), keep=3)
    newest = save_checkpoint(tmp_path, 8, make_state(8), keep=3)
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's bytes: still a valid safetensors file
    weights.write_bytes(bytes(data))
    assert load_file(weights).keys() == make_state(8)["model"].keys()  # loads, silently wrong
    with caplog.at_level(logging.WARNING, logger="sdflow.store.checkpoints"):
        step, state = load_latest(tmp_path)
    assert step == 4
    assert_same(state["model"], make_state(4)["model"])
    assert "step-000008" in caplog.text and "SHA-256" in caplog.text


@pytest.mark.parametrize(
    "meta",
    [
        [],
        {"format": 2, "step": "8", "files": {}, "state": {}},
        {"format": 2, "step": 8, "files": [], "state": {}},
        {"format": 2, "step": 8, "files": {"model.safetensors": "big"}, "state": {}},
        {"format": 2, "step": 8, "files": {}, "state": []},
        {"format": 2, "step": 8},
    ],
)
def test_a_state_json_of_the_wrong_shape_falls_back(tmp_path, meta):
    save_checkpoint(tmp_path, 4, make_state(4), keep=3)
    newest = save_checkpoint(tmp_path, 8, make_state(8), keep=3)
    (newest / "state.json").write_text(json.dumps(meta))
    assert load_latest(tmp_path)[0] == 4


def test_checkpoints_of_format_1_still_load(tmp_path):
    path = save_checkpoint(tmp_path, 3, make_state(3), keep=1)
    meta = json.loads((path / "state.json").read_text())
    meta["format"] = 1
    meta["files"] = {name: entry["size"] for name, entry in meta["files"].items()}
    (path / "state.json").write_text(json.dumps(meta))
    step, state = load_latest(tmp_path)
    assert step == 3
    assert_same(state["model"], make_state(3)["model"])
