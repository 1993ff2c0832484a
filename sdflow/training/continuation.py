"""Continue training: a run asked for more steps starts from a finished, shorter run of its lineage.

A train output records its *lineage* (the fingerprint of everything that decides the weights of
each step done: data, model, optimizer, schedule; not the number of steps, when the lr schedule
does not depend on it) and its step count. A new run of the same lineage with more steps finds the
longest finished one below it, hard-links its newest checkpoint into the new partial directory
(checkpoint files are never rewritten in place, so sharing them is safe) and the loop resumes from
there. With the optimizer state kept (`train.keep_optimizer_state`) it reaches the same weights as
a run that went straight to the new step count; without it (the default) Adam's moments restart
from zero, which the log says, and the weights follow another path from the shared step on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from sdflow.store.checkpoints import LATEST, best_step, list_checkpoints, mark_best, step_name
from sdflow.store.stageio import load_manifest, write_atomic, write_json

CONTINUED = "continued_from.json"  # in the partial directory: where a continued run started

log = logging.getLogger("sdflow.train")


@dataclass(frozen=True)
class Predecessor:
    """A finished output of the same lineage, and where its last checkpoint is."""

    key: str
    steps: int
    checkpoint: Path


def find_predecessor(stage_root: Path, lineage: str, max_steps: int) -> Predecessor | None:
    """The finished output under `stage_root` of this lineage with the most steps below
    `max_steps` whose last checkpoint is still there; None when there is none."""
    found: list[Predecessor] = []
    if not stage_root.is_dir():
        return None
    for directory in sorted(stage_root.iterdir()):
        manifest = None if directory.name.startswith(".") else load_manifest(directory)
        if not manifest or manifest.get("info", {}).get("lineage") != lineage:
            continue
        steps = int(manifest["counts"]["steps"])
        checkpoints = directory / manifest["files"].get("checkpoints", "checkpoints")
        if steps < max_steps and steps in list_checkpoints(checkpoints):
            found.append(Predecessor(directory.name, steps, checkpoints / step_name(steps)))
    return max(found, key=lambda p: p.steps, default=None)


def seed_checkpoints(checkpoints: Path, predecessor: Predecessor) -> None:
    """Make the predecessor's last checkpoint the newest one under `checkpoints` (hard links,
    or a copy across file systems), written as a temporary directory renamed into place; its
    best one (`train.keep_best`) comes along, still marked best."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    best = best_step(predecessor.checkpoint.parent)
    if best is not None and best != predecessor.steps:
        _link_checkpoint(predecessor.checkpoint.parent / step_name(best), checkpoints)
        mark_best(checkpoints, best)
    name = _link_checkpoint(predecessor.checkpoint, checkpoints)
    write_atomic(checkpoints / LATEST, name + "\n")
    if best == predecessor.steps:
        mark_best(checkpoints, best)


def _link_checkpoint(source: Path, checkpoints: Path) -> str:
    name = source.name
    tmp = checkpoints / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(source, tmp, copy_function=os.link)
    except OSError:  # another file system: hard links cannot cross it
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
    os.replace(tmp, checkpoints / name)
    return name


def continue_from_predecessor(
    build_path: Path, checkpoints: Path, lineage: str, max_steps: int
) -> dict | None:
    """Seed a fresh build's `checkpoints` from the best predecessor among its stage's outputs and
    return {key, step} of it (also on a retry of that build); None when starting from scratch.

    A build that already has checkpoints of its own resumes from those instead.
    """
    record = build_path / CONTINUED
    if record.is_file():
        return json.loads(record.read_text())
    if list_checkpoints(checkpoints):
        return None
    predecessor = find_predecessor(build_path.parent, lineage, max_steps)
    if predecessor is None:
        return None
    seed_checkpoints(checkpoints, predecessor)
    origin = {"key": predecessor.key, "step": predecessor.steps}
    write_json(record, origin)
    log.info(
        "Continuing training from the finished run %s at step %d (train.max_steps is now %d)",
        predecessor.key,
        predecessor.steps,
        max_steps,
    )
    return origin
