"""The stage-output contract, written once and used by every stage.

A stage writes `WORKDIR/stages/<stage>/<key>/`, where `key` fingerprints the upstream outputs, the
stage's config and its code version. Work happens in the sibling `.<key>.partial/`, which survives a
crash so finished shards are kept; `MANIFEST.json` is written last and the directory is renamed into
place only when complete, so a visible stage directory is always a finished one. Every rename that
publishes a file or a directory is followed by an fsync of its parent, so it survives a power loss.

The manifest's `fingerprint` is what downstream keys are made of, so it covers only the content later
stages consume: every file of the stage directory except `MANIFEST.json` and the run-history folders
in `HISTORY` (checkpoints, which record training seconds; TensorBoard logs, which record wall-clock
times) and the reuse index a later build may add (`ROWS_INDEX`). Timings, attempt counts, hosts and paths go into the manifest's `info`, never into a file
outside `HISTORY`; `counts` hold whole numbers only. So an interrupted-then-resumed stage and an
uninterrupted one have the same fingerprint, and nothing downstream is rebuilt after a crash.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sdflow.store.fingerprint import hash_json, hash_tree

SCHEMA_VERSION = 1
MANIFEST = "MANIFEST.json"
FAILURES = "failures"
ADDRESS = re.compile(r" (?:object )?at 0x[0-9a-fA-F]+")
# Top-level folders of a stage directory that record how it was built, not what it holds.
HISTORY = ("checkpoints", "logs")
# A top-level folder derived from the content after publication (the reuse index of the row records,
# `sdflow.store.rowindex`, written by the first later build that searches the output): not content.
ROWS_INDEX = "rows-index"
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


class ManifestUnreadable(OSError):
    """A manifest that exists but cannot be read now: an I/O error, not a missing output."""


def load_manifest(directory: str | Path) -> Manifest | None:
    """The manifest of a complete stage directory, or None when there is no valid one.

    None means absent, corrupt or of another schema version. An I/O error while reading an existing
    manifest raises ManifestUnreadable instead (transient: the stage is retried), so a complete
    output is never taken for missing and rebuilt, or removed, because one read failed.
    """
    path = Path(directory) / MANIFEST
    try:
        text = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise ManifestUnreadable(exc.errno, f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        manifest = json.loads(text)
    except ValueError:
        return None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
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
    publish(tmp, path)


def publish(tmp: Path, target: Path) -> None:
    """Rename a finished file or directory into place and make the rename itself durable."""
    os.replace(tmp, target)
    fsync_dir(target.parent)


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | Path, value: Any, sort_keys: bool = True) -> None:
    write_atomic(path, json.dumps(value, indent=2, sort_keys=sort_keys, default=str) + "\n")


def write_table(path: str | Path, table: pa.Table) -> None:
    """Atomically write a parquet file (a shard, a failures table)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as fh:  # durable before it becomes visible, also across a power loss
        os.fsync(fh.fileno())
    publish(tmp, path)


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
        """Temp files and directories of writes a crash interrupted (`write_atomic`, `atomic_dir`)
        and trash of replaced ones whose delete it interrupted (`.<name>.trash-*`): never part of
        the output or its fingerprint. Run when a build starts and again before it is published."""
        debris = [*self.path.rglob(".*.tmp"), *self.path.rglob(".*.trash-*")]
        for temp in sorted(debris, key=lambda p: len(p.parts)):
            if temp.is_dir() and not temp.is_symlink():
                shutil.rmtree(temp, ignore_errors=True)
            else:
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
        self.clear_debris()
        manifest: Manifest = {
            "stage": self.stage,
            "key": self.key,
            "schema_version": SCHEMA_VERSION,
            "fingerprint": content_fingerprint(self.path),
            "path": self.final.relative_to(self.workdir).as_posix(),
            "seconds": round(time.monotonic() - self.started, 3),
            "counts": _whole_numbers(counts),
            "shards": list(shards),
            "files": dict(files or {}),
            "info": dict(info or {}),
        }
        write_json(self.path / MANIFEST, manifest)
        publish(self.path, self.final)
        return manifest


def content_fingerprint(directory: str | Path) -> str:
    """The fingerprint of a stage directory: its content, never its history (see the module doc)."""
    return hash_tree(directory, skip=(MANIFEST,), skip_dirs=(*HISTORY, ROWS_INDEX))


def _whole_numbers(counts: Mapping[str, Any]) -> dict[str, Any]:
    """Counts are counts (whole numbers, or a mapping of them such as failures by reason): a rate
    or a duration belongs in `info`."""

    def whole(value: Any) -> bool:
        if isinstance(value, Mapping):
            return all(whole(v) for v in value.values())
        return isinstance(value, int) and not isinstance(value, bool)

    bad = {k: v for k, v in counts.items() if not whole(v)}
    if bad:
        raise TypeError(f"manifest counts must be whole numbers; move {bad} into info")
    return dict(counts)


def lock_path(final: Path) -> Path:
    """The flock file a builder of stage directory `final` holds (`stages/<stage>/.<key>.lock`)."""
    return final.with_name(f".{final.name}.lock")


@contextmanager
def stage_lock(final: Path) -> Iterator[None]:
    """One builder per stage key at a time, across processes on this host (also held by the reuse
    index's builder, `sdflow.store.rowindex`)."""
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
    with stage_lock(final):
        existing = load_manifest(final)
        if existing is not None:
            return {**existing, "reused": True}
        if final.exists():  # no valid manifest: corrupt, or debris from an old layout
            discard_stage(workdir, stage, key)
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
    """Write a directory beside `target`, then rename it into place: never half a model on disk.

    Every file and directory written is fsynced before the rename (which `publish` makes durable),
    so a power loss leaves the old directory or the whole new one, never empty files under the new
    name. A replaced directory is renamed to `.<name>.trash-*` first; a kill during its delete
    leaves that debris, which `StageBuild.clear_debris` and `sdflow gc` remove."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            trash = target.with_name(f".{target.name}.trash-{uuid.uuid4().hex[:8]}")
            publish(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fsync_tree(root: Path) -> None:
    """fsync every regular file below `root`, then every directory, deepest first (symlinks are
    not followed)."""
    for folder, _dirs, files in sorted(os.walk(root), key=lambda w: -len(Path(w[0]).parts)):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(folder)


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
    """Rows of {id, source, reason, detail} as a failures table.

    Failures are stage content (they enter the fingerprint), so details lose what differs between
    two runs over the same input: object addresses in exception texts (`<_io.BytesIO object at
    0x7f...>`).
    """
    clean = [{**r, "detail": _stable_text(r.get("detail"))} for r in rows]
    return pa.Table.from_pylist(clean, schema=FAILURE_SCHEMA)


def _stable_text(text: str | None) -> str | None:
    return ADDRESS.sub("", text) if text else text


def read_failures(workdir: str | Path, manifest: Manifest) -> pa.Table:
    """Every sample this stage rejected, with its reason (all shards together: failures are small)."""
    base = output_dir(workdir, manifest) / FAILURES
    tables = [pq.read_table(p) for p in sorted(base.glob("shard-*.parquet"))]
    return pa.concat_tables(tables) if tables else empty_failures()
