"""`sdflow gc`: give back the disk space a workdir no longer needs.

    sdflow gc [--keep-runs N] [--dry-run] [--workdir DIR]

Keeps every stage output that the newest N runs' `runs/<id>/summary.json`, or any
`sweeps/*/summary.json`, points into. Removes the other stage outputs, abandoned `.<key>.partial`
build directories, the debris of interrupted writes and deletes (`.*.tmp`, `.*.trash-*`, checkpoint
temporaries) and, inside the kept outputs, every checkpoint but the newest. A stage directory whose
lock (`stages/<stage>/.<key>.lock`, held by a running build) is taken is left alone, and gc holds that
lock while it removes, so no build starts under it. Directories are renamed away before they are
deleted: a crash in the middle leaves only `.trash-` debris, which the next gc removes.

What gc deletes is confined to the real `stages/` directory: a manifest's path that leads out of
its output (`files.checkpoints: ../../..`) is refused, symlinked stage folders and outputs are
never walked (a symlink is removed as itself), and the parent of everything removed is resolved
and checked just before it goes. While a run holds its lease (`sdflow.store.lease`), no
unreferenced output is removed: the running run may be using it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import humanize

from sdflow.errors import UserError
from sdflow.store.checkpoints import stale_checkpoints
from sdflow.store.lease import held_leases
from sdflow.store.stageio import load_manifest, try_stage_lock

CATEGORIES = ("unreferenced outputs", "abandoned partial builds", "old checkpoints", "debris")
DEBRIS = re.compile(r"^\.(?:.+\.tmp|.+\.trash-.+|tmp-step-.+|trash-.+)$")
StageRef = tuple[str, str]  # (stage, key)


@dataclass(frozen=True)
class Doomed:
    """One thing gc removes: its category, its size and the stage directory whose lock guards it."""

    category: str
    path: Path
    size: int
    guard: Path | None


@dataclass
class GcReport:
    dry_run: bool
    runs: list[str]
    sweeps: int
    kept: int
    freed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    skipped: list[Path] = field(default_factory=list)
    refused: list[Path] = field(default_factory=list)  # would reach outside stages/
    leases: list[Path] = field(default_factory=list)  # runs running, so outputs kept

    @property
    def total(self) -> int:
        return sum(self.freed.values())

    def lines(self, workdir: Path) -> list[str]:
        """What `sdflow gc` prints: what it kept, what it freed per category, what it skipped."""
        verb = "Would free" if self.dry_run else "Freed"
        lines = [
            f"Kept {self.kept} stage outputs referenced by {len(self.runs)} run(s)"
            f" and {self.sweeps} sweep(s).",
            f"{verb} {_size(self.total)}:",
        ]
        width = max(len(c) for c in CATEGORIES)
        for category in CATEGORIES:
            amount = f"{_size(self.freed[category]):>10}"
            lines.append(f"  {category:<{width}}  {amount}  ({self.removed[category]})")
        for path in self.skipped:
            lines.append(f"Skipped (a running build holds it): {path.relative_to(workdir)}")
        for path in self.leases:
            lines.append(f"Kept every unreferenced output: run {path.parent.name} is running.")
        for path in self.refused:
            lines.append(f"Refused (outside {workdir / 'stages'}): {path}")
        return lines


def collect_garbage(workdir: str | Path, keep_runs: int, dry_run: bool = False) -> GcReport:
    """Remove (or with `dry_run`, only measure) what no kept run or sweep needs."""
    workdir = Path(workdir).resolve()
    if not (workdir / "stages").is_dir():
        raise UserError(f"{workdir} has no stages/ directory: is it an sdflow --workdir?")
    runs = newest_runs(workdir, keep_runs)
    sweeps = sorted(workdir.glob("sweeps/*/summary.json"))
    keep = set().union(*(_refs(_read_summary(p)) for p in [*runs, *sweeps]))
    report = GcReport(dry_run, [p.parent.name for p in runs], len(sweeps), kept=0)
    for item in plan(workdir, keep):
        if not _confined(item.path, workdir / "stages"):
            report.refused.append(item.path)
            continue
        if item.category == CATEGORIES[0]:  # leases checked again before each output
            report.leases = report.leases or held_leases(workdir)
            if report.leases:
                continue
        if _dispose(item, dry_run):
            report.freed[item.category] += item.size
            report.removed[item.category] += 1
        else:
            report.skipped.append(item.path)
    report.kept = sum((workdir / "stages" / s / k).is_dir() for s, k in keep)
    return report


def newest_runs(workdir: Path, keep_runs: int) -> list[Path]:
    """The summary.json files of the newest `keep_runs` runs (by start time, then run id)."""
    summaries = [(_read_summary(p).get("started_at") or "", p) for p in _run_summaries(workdir)]
    summaries.sort(key=lambda pair: (pair[0], pair[1].parent.name), reverse=True)
    return [p for _, p in summaries[:keep_runs]]


def plan(workdir: Path, keep: set[StageRef]) -> Iterator[Doomed]:
    """Everything under `stages/` that is not a kept output, and the leftovers inside kept ones."""
    stages = [p for p in (workdir / "stages").iterdir() if p.is_dir() and not p.is_symlink()]
    for stage in sorted(stages):
        for entry in sorted(stage.iterdir()):
            name = entry.name
            if name.endswith(".lock"):
                continue  # a lock file is shared by builders and must never be replaced
            if not name.startswith("."):
                if (stage.name, name) in keep:
                    if not entry.is_symlink():  # never walk into a folder elsewhere
                        yield from _inside_kept(entry)
                else:
                    yield Doomed(CATEGORIES[0], entry, tree_size(entry), guard=entry)
            elif name.endswith(".partial"):
                final = stage / name[1 : -len(".partial")]
                yield Doomed(CATEGORIES[1], entry, tree_size(entry), guard=final)
            elif DEBRIS.match(name):
                yield Doomed(CATEGORIES[3], entry, tree_size(entry), guard=None)


def tree_size(path: Path) -> int:
    """Bytes of the files in `path` (apparent sizes; symlinks count as themselves)."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.lstat(os.path.join(root, f)).st_size for f in files)
    return total


def _inside_kept(output: Path) -> Iterator[Doomed]:
    for root, dirs, files in os.walk(output):
        for name in [*dirs, *files]:
            if DEBRIS.match(name):
                path = Path(root) / name
                yield Doomed(CATEGORIES[3], path, tree_size(path), guard=output)
        dirs[:] = [d for d in dirs if not DEBRIS.match(d)]
    manifest = load_manifest(output)
    checkpoints = (manifest or {}).get("files", {}).get("checkpoints")
    if isinstance(checkpoints, str) and checkpoints and _confined(output / checkpoints, output):
        for path in stale_checkpoints(output / checkpoints, keep=1):
            yield Doomed(CATEGORIES[2], path, tree_size(path), guard=output)


def _confined(path: Path, root: Path) -> bool:
    """Whether `path` lies strictly inside `root` once every symlink above it is resolved
    (`path` itself may be a symlink: it is removed as itself, never followed)."""
    base, parent = os.path.realpath(root), os.path.realpath(path.parent)
    inside = os.path.commonpath([parent, base]) == base
    return inside and path.name not in ("", ".", "..") and os.path.join(parent, path.name) != base


def _dispose(item: Doomed, dry_run: bool) -> bool:
    """Remove `item` unless a running build holds its stage lock; False when skipped."""
    lock = try_stage_lock(item.guard) if item.guard is not None else nullcontext(True)
    with lock as free:
        if not free:
            return False
        if not dry_run:
            _remove(item.path)
        return True


def _remove(path: Path) -> None:
    """Delete a file, or rename a directory away first so it never exists half-deleted."""
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return
    if not DEBRIS.match(path.name):
        trash = path.with_name(f".{path.name.lstrip('.')}.trash-{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
        path = trash
    shutil.rmtree(path)


def _run_summaries(workdir: Path) -> list[Path]:
    return sorted(workdir.glob("runs/*/summary.json"))


def _read_summary(path: Path) -> dict[str, Any]:
    """A run or sweep summary; gc stops rather than guess what an unreadable one references."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(
            f"Cannot read {path} ({exc}), so gc cannot tell which stage outputs it needs. "
            "Fix or delete that file, then run gc again."
        ) from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a {type(value).__name__}, not a summary object.")
    return value


def _refs(value: Any) -> set[StageRef]:
    """(stage, key) of every path in a summary that points into `stages/<stage>/<key>`."""
    if isinstance(value, dict):
        return set().union(*(_refs(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_refs(v) for v in value))
    if isinstance(value, str) and "stages/" in value:
        parts = Path(value).parts
        # the last `stages/<stage>/<key>` in the path: survives a moved or renamed workdir
        hits = [i for i, part in enumerate(parts[:-2]) if part == "stages"]
        if hits:
            return {(parts[hits[-1] + 1], parts[hits[-1] + 2])}
    return set()


def _size(n: int) -> str:
    return humanize.naturalsize(n, binary=True)
