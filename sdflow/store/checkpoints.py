"""Crash-safe training checkpoints, shared by the autoencoder and train stages.

A checkpoint is a nested state (model weights, EMA, optimizer, lr scheduler, RNG states, step, data
position). Its tensors go into safetensors files, one per top-level group (`model.safetensors` holds
the weights under their parameter names), and everything else into `state.json`; no pickles.

Layout under a checkpoint root (a stage's partial dir `checkpoints/`):
```
.tmp-step-000008/   being written; never read, removed by the next save
step-000004/        complete: <group>.safetensors ... + state.json (written last: sizes, sha256)
LATEST              "step-000004", replaced atomically after the rename
BEST                "step-000002": the lowest validation loss (`train.keep_best`), never pruned
```
A directory is renamed into place only after every file in it is written and fsynced, and LATEST moves
only after that, so a crash at any moment leaves the previous checkpoint intact. Loading checks each
file's size and SHA-256 against `state.json` and falls back, with a warning, to the newest older
checkpoint that is intact: a truncated, bit-flipped or malformed checkpoint is never trained on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sdflow.store.fingerprint import hash_file
from sdflow.store.stageio import fsync_dir, write_atomic

FORMAT_VERSION = 2  # 1: sizes only (still readable); 2: sizes and content hashes
LATEST = "LATEST"
BEST = "BEST"
STATE = "state.json"
STEP_DIR = re.compile(r"^step-(\d{6,})$")

log = logging.getLogger("sdflow.store.checkpoints")


class CheckpointError(Exception):
    """A checkpoint directory that is incomplete or corrupt."""


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(root: str | Path, step: int, state: Mapping[str, Any], keep: int) -> Path:
    """Write `state` as checkpoint `step`, point LATEST at it, then keep only the newest `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(root)
    tmp = root / f".tmp-{step_name(step)}"
    tmp.mkdir()
    _write_contents(tmp, step, state)
    final = root / step_name(step)
    if final.exists():  # a complete copy of the same step from an earlier attempt
        _remove_dir(final)
    os.replace(tmp, final)
    fsync_dir(root)
    write_atomic(root / LATEST, step_name(step) + "\n")
    fsync_dir(root)
    prune_checkpoints(root, keep)
    return final


def load_latest(root: str | Path) -> tuple[int, dict[str, Any]] | None:
    """(step, state) of the newest readable checkpoint, or None when there is none."""
    for path in _candidates(Path(root)):
        try:
            return load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("Skipping unreadable checkpoint %s: %s", path, exc)
    return None


def load_checkpoint(path: str | Path) -> tuple[int, dict[str, Any]]:
    """Read and validate one checkpoint directory; raises CheckpointError when it is not complete."""
    path = Path(path)
    try:
        meta = json.loads((path / STATE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"no readable {STATE}: {exc}") from None
    try:
        return _load(path, meta)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise CheckpointError(f"{STATE} has an unexpected shape ({exc!r})") from None


def _load(path: Path, meta: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    if meta.get("format") not in (1, FORMAT_VERSION):
        raise CheckpointError(f"unknown format {meta.get('format')!r}")
    step = meta["step"]
    if not isinstance(step, int) or isinstance(step, bool):
        raise TypeError(f"step is {step!r}")
    tensors: dict[str, torch.Tensor] = {}
    for name, expected in meta["files"].items():
        file = path / name
        _verify(file, expected if isinstance(expected, dict) else {"size": expected})
        group = name.removesuffix(".safetensors")
        try:
            tensors.update({f"{group}/{k}": v for k, v in load_file(file).items()})
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{name} is unreadable: {exc}") from None
    try:
        state = {
            group: _rebuild(skeleton, tensors, group) for group, skeleton in meta["state"].items()
        }
    except KeyError as exc:
        raise CheckpointError(f"tensor {exc} is missing") from None
    return step, state


def _verify(file: Path, expected: Mapping[str, Any]) -> None:
    """Size first (cheap), then the content hash (format 2): catches truncation and flipped bits."""
    if not file.is_file() or file.stat().st_size != expected["size"]:
        raise CheckpointError(f"{file.name} is missing or has the wrong size")
    if "sha256" in expected and hash_file(file) != expected["sha256"]:
        raise CheckpointError(f"{file.name} does not match its recorded SHA-256 (corrupted)")


def list_checkpoints(root: str | Path) -> list[int]:
    """Steps of the complete-looking checkpoint directories under `root`, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = (STEP_DIR.match(p.name) for p in root.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in steps if m)


def mark_best(root: str | Path, step: int) -> None:
    """Point BEST at checkpoint `step` (which must exist): pruning keeps it from now on."""
    root = Path(root)
    if not (root / step_name(step)).is_dir():
        raise CheckpointError(f"no checkpoint of step {step} to mark as the best one")
    write_atomic(root / BEST, step_name(step) + "\n")
    fsync_dir(root)


def best_step(root: str | Path) -> int | None:
    """The step BEST points to, or None."""
    name = _read_pointer(Path(root), BEST)
    return int(name.split("-")[1]) if name else None


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints; the ones LATEST and BEST point to stay."""
    for path in stale_checkpoints(root, keep):
        _remove_dir(path)


def stale_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """The checkpoint directories beyond the newest `keep`, never one LATEST or BEST points to."""
    root = Path(root)
    pointed = {_read_pointer(root), _read_pointer(root, BEST)}
    old = list_checkpoints(root)[:-keep]
    return [root / step_name(s) for s in old if step_name(s) not in pointed]


def _write_contents(directory: Path, step: int, state: Mapping[str, Any]) -> None:
    files: dict[str, dict[str, Any]] = {}
    skeletons: dict[str, Any] = {}
    for group, value in state.items():
        tensors: dict[str, torch.Tensor] = {}
        skeletons[group] = _flatten(value, tensors, group)
        if tensors:
            name = f"{group}.safetensors"
            save_file(tensors, directory / name)
            _fsync_file(directory / name)
            files[name] = {
                "size": (directory / name).stat().st_size,
                "sha256": hash_file(directory / name),
            }
    meta = {"format": FORMAT_VERSION, "step": step, "files": files, "state": skeletons}
    write_atomic(directory / STATE, json.dumps(meta, indent=1))  # key order kept: it is data
    fsync_dir(directory)


def _flatten(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """JSON skeleton of `value`; tensors are moved into `tensors` and replaced by references.

    A tensor is named by its path below the group, so `model.safetensors` is a plain state dict
    and optimizer moments read `state/0/exp_avg`. Dicts with non-string keys (optimizer state is
    keyed by parameter index) are stored as pairs so the keys keep their type.
    """
    if isinstance(value, torch.Tensor):
        name = path.split("/", 1)[1] if "/" in path else path
        if name in tensors:
            raise ValueError(f"two tensors would share the checkpoint name {name!r}")
        tensors[name] = value.detach().to("cpu").contiguous()
        return {"__tensor__": name}
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value):
            return {k: _flatten(v, tensors, f"{path}/{k}") for k, v in value.items()}
        return {"__pairs__": [[k, _flatten(v, tensors, f"{path}/{k}")] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return [_flatten(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {path!r} in a checkpoint")


def _rebuild(skeleton: Any, tensors: Mapping[str, torch.Tensor], group: str) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[f"{group}/{skeleton['__tensor__']}"]
        if "__pairs__" in skeleton:
            return {k: _rebuild(v, tensors, group) for k, v in skeleton["__pairs__"]}
        return {k: _rebuild(v, tensors, group) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [_rebuild(v, tensors, group) for v in skeleton]
    return skeleton


def _candidates(root: Path) -> list[Path]:
    """LATEST's target first, then every other complete-looking checkpoint, newest first."""
    ordered = [root / step_name(s) for s in reversed(list_checkpoints(root))]
    pointed = _read_pointer(root)
    if pointed and (root / pointed) in ordered:
        ordered.remove(root / pointed)
        ordered.insert(0, root / pointed)
    return ordered


def _read_pointer(root: Path, pointer: str = LATEST) -> str | None:
    try:
        name = (root / pointer).read_text().strip()
    except OSError:
        return None
    return name if STEP_DIR.match(name) else None


def _remove_temporaries(root: Path) -> None:
    """Half-written or half-deleted checkpoints from a crash (one writer holds a partial dir)."""
    for path in root.glob(".tmp-step-*"):
        _remove_dir(path)
    for path in root.glob(".trash-*"):
        shutil.rmtree(path, ignore_errors=True)


def _remove_dir(path: Path) -> None:
    """Rename away first, so a crash mid-delete never leaves a half-deleted step directory."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:6]}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
