"""The stage-output contract, written once and used by every stage.

A stage writes `WORKDIR/stages/<stage>/<key>/`, where `key` fingerprints the upstream outputs, the
stage's config and its code version. Work happens in the sibling `.<key>.partial/`, which survives a
crash so finished shards are kept; `MANIFEST.json` is written last and the directory is renamed into
place only when complete, so a visible stage directory is always a finished one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sdflow.fingerprint import hash_json, hash_tree

SCHEMA_VERSION = 1
MANIFEST = "MANIFEST.json"
FAILURES = "failures"
FAILURE_SCHEMA = pa.schema(
    [("id", pa.string()), ("source", pa.string()), ("reason", pa.string()), ("detail", pa.string())]
)

Manifest = dict[str, Any]
"""JSON-able: stage, key, fingerprint, schema_version, seconds, counts, shards, files, info, path."""


def stage_key(
    stage: str,
    config: Any,
    upstream: Sequence[Manifest | None] = (),
    code: str = "",
) -> str:
    """Fingerprint of everything that decides a stage's output."""
    return hash_json(
        {
            "stage": stage,
            "schema": SCHEMA_VERSION,
            "config": config,
            "upstream": [m["fingerprint"] if m else None for m in upstream],
            "code": code,
        }
    )[:20]


def stage_dir(workdir: str | Path, stage: str, key: str) -> Path:
    return Path(workdir) / "stages" / stage / key


def load_manifest(directory: str | Path) -> Manifest | None:
    """The manifest of a complete stage directory, or None when absent or unreadable."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        return None
    return manifest


def output_dir(workdir: str | Path, manifest: Manifest) -> Path:
    """Absolute directory of a manifest's stage output (manifests store it workdir-relative)."""
    return Path(workdir) / manifest["path"]


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write to a temp file beside `path`, fsync, then rename: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode) as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, value: Any, sort_keys: bool = True) -> None:
    write_atomic(path, json.dumps(value, indent=2, sort_keys=sort_keys, default=str) + "\n")


def write_table(path: str | Path, table: pa.Table) -> None:
    """Atomically write a parquet file (a shard, a failures table)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as fh:  # durable before it becomes visible, also across a power loss
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class StageBuild:
    """The partial directory of a stage being built; shards written here survive a crash."""

    def __init__(self, workdir: Path, stage: str, key: str):
        self.workdir = workdir
        self.stage = stage
        self.key = key
        self.final = stage_dir(workdir, stage, key)
        self.path = self.final.with_name(f".{key}.partial")
        self.started = time.monotonic()

    def clear_debris(self) -> None:
        """Temp files of writes a crash interrupted: never part of the output or its fingerprint."""
        for temp in self.path.rglob(".*.tmp"):
            temp.unlink(missing_ok=True)

    def has(self, name: str) -> bool:
        """Whether a file (e.g. a finished shard) already exists in the partial directory."""
        return (self.path / name).exists()

    def write_table(self, name: str, table: pa.Table) -> Path:
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        write_table(target, table)
        return target

    def write_shard(self, index: int, kept: pa.Table, failures: pa.Table | None = None) -> str:
        """Write shard `index` and its failures; the kept shard last, so `has()` means both exist."""
        failed = failures if failures is not None else empty_failures()
        self.write_table(f"{FAILURES}/{shard_name(index)}", failed.cast(FAILURE_SCHEMA))
        name = shard_name(index)
        self.write_table(name, kept)
        return name

    def finish(
        self,
        counts: Mapping[str, Any],
        shards: Sequence[str] = (),
        files: Mapping[str, str] | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """Fingerprint the content, write MANIFEST.json last, and rename into place."""
        manifest: Manifest = {
            "stage": self.stage,
            "key": self.key,
            "schema_version": SCHEMA_VERSION,
            "fingerprint": hash_tree(self.path, skip=(MANIFEST,)),
            "path": self.final.relative_to(self.workdir).as_posix(),
            "seconds": round(time.monotonic() - self.started, 3),
            "counts": dict(counts),
            "shards": list(shards),
            "files": dict(files or {}),
            "info": dict(info or {}),
        }
        write_json(self.path / MANIFEST, manifest)
        os.replace(self.path, self.final)
        return manifest


def lock_path(final: Path) -> Path:
    """The flock file a builder of stage directory `final` holds (`stages/<stage>/.<key>.lock`)."""
    return final.with_name(f".{final.name}.lock")


@contextmanager
def _stage_lock(final: Path) -> Iterator[None]:
    """One builder per stage key at a time, across processes on this host."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path(final), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def try_stage_lock(final: Path) -> Iterator[bool]:
    """The stage lock if nobody holds it (True, held until exit), else False at once."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path(final), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_stage(
    workdir: str | Path,
    stage: str,
    key: str,
    work: Callable[[StageBuild], Manifest],
) -> Manifest:
    """Return the complete output for `key`, building it with `work(build)` only when absent.

    The returned manifest carries `reused: True` when nothing had to be built.
    """
    workdir = Path(workdir).resolve()
    final = stage_dir(workdir, stage, key)
    existing = load_manifest(final)
    if existing is not None:
        return {**existing, "reused": True}
    with _stage_lock(final):
        existing = load_manifest(final)
        if existing is not None:
            return {**existing, "reused": True}
        if final.exists():  # a directory without a valid manifest is debris from an old layout
            shutil.rmtree(final)
        build = StageBuild(workdir, stage, key)
        build.path.mkdir(parents=True, exist_ok=True)
        build.clear_debris()
        manifest = work(build)
    return {**manifest, "reused": False}


def discard_stage(workdir: str | Path, stage: str, key: str) -> None:
    """Remove a stage output (for --refresh): renamed away first so it vanishes at once."""
    final = stage_dir(workdir, stage, key)
    if final.exists():
        trash = final.with_name(f".{key}.trash-{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Write a directory beside `target`, then rename it into place: never half a model on disk."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def shard_paths(workdir: str | Path, manifest: Manifest) -> list[Path]:
    base = output_dir(workdir, manifest)
    return [base / name for name in manifest["shards"]]


def read_shards(
    workdir: str | Path, manifest: Manifest, columns: Sequence[str] | None = None
) -> Iterator[pa.Table]:
    """Yield the stage's shards one at a time, so memory stays flat as the dataset grows."""
    for path in shard_paths(workdir, manifest):
        yield pq.read_table(path, columns=list(columns) if columns else None)


def shard_name(index: int, suffix: str = "parquet") -> str:
    return f"shard-{index:05d}.{suffix}"


def empty_failures() -> pa.Table:
    return FAILURE_SCHEMA.empty_table()


def failures_table(rows: Sequence[Mapping[str, str]]) -> pa.Table:
    """Rows of {id, source, reason, detail} as a failures table."""
    return pa.Table.from_pylist([dict(r) for r in rows], schema=FAILURE_SCHEMA)


def read_failures(workdir: str | Path, manifest: Manifest) -> pa.Table:
    """Every sample this stage rejected, with its reason (all shards together: failures are small)."""
    base = output_dir(workdir, manifest) / FAILURES
    tables = [pq.read_table(p) for p in sorted(base.glob("shard-*.parquet"))]
    return pa.concat_tables(tables) if tables else empty_failures()
