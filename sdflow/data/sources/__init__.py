"""Where raw samples come from: a URL list (`urls`), a datasets dataset (`hf`), a folder (`folder`)
or WebDataset tar shards (`webdataset`).

Each source module offers `open_rows(source) -> Rows` (a stream of `SourceRow`s in a stable order,
so row i is always the same sample) and `fingerprint(source) -> str` (a hash of the source content,
so an edited file under an old name is never mistaken for the old one).
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import math
import os
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from types import ModuleType
from typing import Any

import pyarrow as pa

from sdflow.config import SourceConfig
from sdflow.data.imaging import Rejected
from sdflow.errors import UserError

URL_COLUMNS = ("url", "URL")
CAPTION_COLUMNS = ("caption", "TEXT", "text")
METADATA_COLUMNS = (  # LAION / img2dataset / DataComp fields a filter may use, when present
    "similarity",
    "pwatermark",
    "punsafe",
    "AESTHETIC_SCORE",
    "aesthetic_score",
    "clip_b32_similarity_score",
    "clip_l14_similarity_score",
    "original_width",
    "original_height",
    "NSFW",
    "LICENSE",
)

SAMPLE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("orig_width", pa.int32()),
        ("orig_height", pa.int32()),
        ("content_hash", pa.string()),
        ("caption", pa.string()),
        ("source", pa.string()),
        ("metadata", pa.string()),
    ]
)
"""The data shard schema shared by the download, filter and caption outputs."""


@dataclass(frozen=True, slots=True)
class SourceRow:
    """One source sample before download: exactly one of url / data / path says where its bytes are.

    A `path` is read only if it resolves inside `root` (the folder, dataset or shard directory).
    """

    index: int
    id: str | None
    caption: str | None
    source: str
    url: str | None = None
    data: bytes | None = None
    path: str | None = None
    root: str | None = None
    offset: int | None = None  # with `length`: the image is that span of `path` (a tar member)
    length: int | None = None
    metadata: str | None = None  # JSON object of source metadata fields, carried to the shards
    mask: str | None = None  # path of the image's loss mask (folder: NAME.mask.png), inside root


@dataclass
class Rows:
    """A stream of source rows, with the total when it is known cheaply (for the progress bar)."""

    rows: Iterator[SourceRow]
    total: int | None = None


def row_id(index: int) -> str:
    """The default stable id: the zero-padded source row index."""
    return f"{index:08d}"


def metadata_json(source: SourceConfig, record: dict[str, Any]) -> str | None:
    """The fields of `source.metadata_columns` (default METADATA_COLUMNS) that `record` has, as
    sorted-key JSON for the shards' `metadata` column; None when it has none."""
    wanted = METADATA_COLUMNS if source.metadata_columns is None else source.metadata_columns
    chosen = {name: record[name] for name in wanted if _present(record.get(name))}
    return json.dumps(chosen, sort_keys=True, default=str) if chosen else None


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def clean_caption(value: object) -> str | None:
    """A caption as text, or None when absent or blank (the caption stage decides what to do)."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def pick_column(
    found: Sequence[str], explicit: str | None, defaults: Sequence[str], what: str, where: str
) -> str | None:
    """The column to use: `explicit` (which must exist) or the first default present, else None."""
    if explicit is not None:
        if explicit not in found:
            raise UserError(
                f"{where} has no column {explicit!r} (set as {what}); "
                f"its columns are: {', '.join(found) or '(none)'}."
            )
        return explicit
    return next((name for name in defaults if name in found), None)


def module(kind: str) -> ModuleType:
    return importlib.import_module(f"sdflow.data.sources.{kind}")


def open_rows(source: SourceConfig) -> Rows:
    """The source's rows in their stable order, cut to `source.limit`."""
    rows = module(source.kind).open_rows(source)
    if source.limit is None:
        return rows
    total = min(rows.total, source.limit) if rows.total is not None else source.limit
    return Rows(islice(rows.rows, source.limit), total)


def fingerprint(source: SourceConfig) -> str:
    """Content hash of everything the source reads (files, or a hub name + revision)."""
    return module(source.kind).fingerprint(source)


def batched(rows: Iterable[SourceRow], size: int) -> Iterator[list[SourceRow]]:
    iterator = iter(rows)
    while chunk := list(islice(iterator, size)):
        yield chunk


# Content hashes of files already read by this process, keyed by what changes when a file does.
_DIGESTS: dict[tuple, str] = {}
_RACY_S = 2.0  # a file changed this recently may change again within the same timestamp tick


def file_digest(path: str | Path) -> str:
    """sha256 of a file, remembered within this process while its inode, size and times stay put.

    The stage key is computed twice per run (Prefect's cache policy, then the stage itself); this
    avoids reading a large folder twice. Like git's racy-timestamp rule, a file modified in the
    last two seconds is never remembered.
    """
    stat = os.stat(path)
    key = (os.fspath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    cached = _DIGESTS.get(key)
    if cached is not None:
        return cached
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    if time.time() - max(stat.st_mtime, stat.st_ctime) > _RACY_S:
        _DIGESTS[key] = digest
    return digest


def hash_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def hash_files(root: Path, relpaths: Iterable[str]) -> str:
    """One hash over relative paths and contents of the given files below `root`."""
    digest = hashlib.sha256()
    for rel in relpaths:
        digest.update(rel.encode() + b"\0" + file_digest(root / rel).encode() + b"\n")
    return digest.hexdigest()


def unsafe_reason(root: str | Path, path: str | Path) -> str | None:
    """Why a local file must not be read: `outside_source` when it resolves (through symlinks or
    `..`) outside `root`, `not_a_regular_file` for FIFOs, devices, sockets, directories; else None."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, base]) != base:
        return "outside_source"
    try:
        mode = os.stat(real).st_mode
    except OSError:
        return None  # missing: reported when it is read
    return None if stat.S_ISREG(mode) else "not_a_regular_file"


def read_inside(
    path: str, root: str | None, limit: int, span: tuple[int, int] | None = None
) -> bytes:
    """The bytes of a local file (or its `span`, (offset, length)) that is a regular file inside
    `root`, at most `limit` bytes."""
    if root is None:
        raise Rejected("outside_source", f"{path}: the source has no local directory to read from")
    reason = unsafe_reason(root, path)
    if reason is not None:
        raise Rejected(reason, f"{path} (source directory {root})")
    fd = open_below(os.path.realpath(root), os.path.realpath(path), path)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise Rejected("not_a_regular_file", path)
        return _read_span(fh, path, limit, span)


def open_below(base: str, real: str, path: str) -> int:
    """A read-only descriptor of `real`, opened component by component from a descriptor of
    `base` with `O_NOFOLLOW` at every step: a directory or file swapped for a symlink since the
    check fails the open instead of leading out of `base` (no time-of-check/time-of-use gap).
    `O_NONBLOCK`: no hang on a FIFO swapped in."""
    parts = Path(os.path.relpath(real, base)).parts
    if not parts or parts[0] == os.pardir:
        raise Rejected("outside_source", f"{path} (source directory {base})")
    nofollow = os.O_RDONLY | os.O_NOFOLLOW
    try:
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parts[:-1]:
                inner = os.open(part, nofollow | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = inner
            return os.open(parts[-1], nofollow | os.O_NONBLOCK, dir_fd=fd)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise Rejected("missing_file", path) from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a symlink where a checked name was
            raise Rejected("outside_source", f"{path} changed while it was read") from None
        raise Rejected("read_error", f"{path}: {exc}") from None


def _read_span(fh, path: str, limit: int, span: tuple[int, int] | None) -> bytes:
    if span is None:
        data = fh.read(limit + 1)
        if len(data) > limit:
            raise Rejected("too_large", f"{path} is larger than {limit} bytes")
        return data
    offset, length = span
    if length > limit:
        raise Rejected("too_large", f"{length} bytes at {offset} of {path} > {limit}")
    fh.seek(offset)
    data = fh.read(length)
    if len(data) != length:
        raise Rejected("read_error", f"{path} ends inside the image at {offset} ({length} bytes)")
    return data
