"""`webdataset` source: local tar shards as img2dataset and DataComp write them.

`source.path` names the shards: a `.tar` file, a directory (its `*.tar`), a glob (`data/*.tar`) or a
brace range (`data/{00000..00099}.tar`, expanded by `braceexpand`), in that order, each glob sorted.
Every pattern must match at least one tar. A sample is the run of consecutive members sharing a key
(the member name up to the first dot of its base name, WebDataset's `__key__`, which is the id
unless `source.id_column` names a metadata field): its image (`jpg`, `jpeg`, `png` or `webp`), its
caption (the `txt` member, else the `caption` / `TEXT` / `text` field of its metadata, or the field
`source.caption_column` names) and its metadata: the shard's img2dataset parquet (`00000.parquet`
beside `00000.tar`, rows matched on `key`) overlaid with the sample's `json` member. The fields in
`source.metadata_columns` (default `sources.METADATA_COLUMNS`) travel as the `metadata` JSON column
of the download shards, for filters.

Tars are read with the standard library's `tarfile`, one member header at a time, each extension
header checked first (`sdflow.data.sources.tarbounds`: declared sizes bounded before any read, pax
records well formed); nothing is ever extracted, and only regular-file members are used. A brace
range may name at most `MAX_SHARD_PATTERNS` shards, counted before it is expanded. Image bytes are not read here: a row points at
the member (`path`, `offset`, `length`) and the download stage reads it with the same size and pixel
limits as any image. Compressed tars are not supported (members could not be read by offset).
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from sdflow.config import SourceConfig
from sdflow.data.sources import (
    CAPTION_COLUMNS,
    METADATA_COLUMNS,
    Rows,
    SourceRow,
    clean_caption,
    hash_files,
    metadata_json,
)
from sdflow.data.sources.tarbounds import UnsafeTar, brace_count, check_headers
from sdflow.errors import UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
TEXT_LIMIT = 1 << 20  # txt / json members larger than this are ignored
MAX_SHARD_PATTERNS = 1_000_000  # names a brace range may expand to (DataComp-12.8B: ~1.3M shards)
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset's base_plus_ext: key, extension


def shard_paths(source: SourceConfig) -> list[Path]:
    """The tar shards `source.path` names, in order; a pattern matching none is a UserError."""
    from braceexpand import UnbalancedBracesError, braceexpand

    count = brace_count(source.path)
    if count > MAX_SHARD_PATTERNS:
        raise UserError(
            f"source.path {source.path!r} expands to {count} names, more than "
            f"{MAX_SHARD_PATTERNS}. Give a directory of shards or a glob such as data/*.tar."
        )
    try:
        patterns = list(braceexpand(source.path))
    except UnbalancedBracesError as exc:
        raise UserError(
            f"source.path {source.path!r} is not a valid brace pattern: {exc}"
        ) from None
    shards: dict[Path, None] = {}  # ordered, without repeats
    for pattern in patterns:
        matches = _matches(pattern)
        if not matches:
            raise UserError(
                f"source.path {source.path!r} (source.kind 'webdataset'): {pattern!r} matches no "
                ".tar file. Give a .tar file, a directory of them, a glob such as data/*.tar or a "
                "brace range such as data/{00000..00099}.tar."
            )
        shards.update(dict.fromkeys(matches))
    return list(shards)


def _matches(pattern: str) -> list[Path]:
    if glob.has_magic(pattern):
        found = [Path(p) for p in sorted(glob.glob(pattern))]
    elif Path(pattern).is_dir():
        found = sorted(Path(pattern).glob("*.tar"))
    else:
        found = [Path(pattern)]
    return [p for p in found if p.suffix == ".tar" and p.is_file()]


def sidecar(shard: Path) -> Path:
    """img2dataset's per-shard metadata table."""
    return shard.with_suffix(".parquet")


def fingerprint(source: SourceConfig) -> str:
    """Hash of every shard's bytes and its parquet sidecar, relative to their common folder."""
    files = shard_paths(source)
    files += [sidecar(f) for f in files if sidecar(f).is_file()]
    absolute = [f.resolve() for f in files]
    root = Path(os.path.commonpath([p.parent for p in absolute]))
    return hash_files(root, sorted(p.relative_to(root).as_posix() for p in absolute))


def open_rows(source: SourceConfig) -> Rows:
    return Rows(iter_rows(source, shard_paths(source)))


def iter_rows(source: SourceConfig, shards: list[Path]) -> Iterator[SourceRow]:
    index = 0
    for shard in shards:
        table = shard_metadata(source, shard)
        for key, members in samples(shard):
            yield sample_row(source, shard, index, key, members, table.get(key, {}))
            index += 1


def samples(shard: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, {extension: TarInfo, or the parsed text of txt / json}) per run of equal keys."""
    try:
        with open(shard, "rb") as raw:
            yield from _samples(shard, raw)
    except (tarfile.TarError, OSError, UnsafeTar) as exc:
        raise UserError(f"WebDataset shard {shard} could not be read as a tar: {exc}") from None


def _samples(shard: Path, raw: BinaryIO) -> Iterator[tuple[str, dict[str, Any]]]:
    check_headers(raw, 0)  # tarfile.open reads the first header
    with tarfile.open(shard, "r:") as tar:
        key, members = None, {}
        while True:
            check_headers(raw, tar.offset)  # the header tar.next() reads
            if (member := tar.next()) is None:
                break
            tar.members.clear()  # one header at a time, however large the shard
            match = _KEY.match(member.name)
            if not member.isfile() or not match:  # links, devices, dirs: never followed
                continue
            if match.group(1) != key:
                if key is not None:
                    yield key, members
                key, members = match.group(1), {}
            extension = match.group(2).lower()
            members[extension] = _text(tar, member) if extension in ("txt", "json") else member
        if key is not None:
            yield key, members


def _text(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str | None:
    if member.size > TEXT_LIMIT:
        return None
    data = tar.extractfile(member)
    return None if data is None else data.read().decode("utf-8", errors="replace")


def shard_metadata(source: SourceConfig, shard: Path) -> dict[str, dict[str, Any]]:
    """key -> the fields sdflow may use from the shard's img2dataset parquet, or {} without one."""
    path = sidecar(shard)
    if not path.is_file():
        return {}
    used = {"key", source.caption_column, source.id_column, *CAPTION_COLUMNS}
    used.update(METADATA_COLUMNS if source.metadata_columns is None else source.metadata_columns)
    try:
        names = pq.read_schema(path).names
        rows = pq.read_table(path, columns=[n for n in names if n in used]).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"WebDataset metadata {path} could not be read as parquet: {exc}") from None
    return {str(row["key"]): row for row in rows if row.get("key") is not None}


def sample_row(
    source: SourceConfig,
    shard: Path,
    index: int,
    key: str,
    members: dict[str, Any],
    parquet_row: dict[str, Any],
) -> SourceRow:
    record = {**parquet_row, **_json_object(members.get("json"))}
    real = shard.resolve()
    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    ident = key if source.id_column is None else record.get(source.id_column)
    return SourceRow(
        index,
        None if ident is None else str(ident),
        caption_of(source, members.get("txt"), record),
        f"{shard}:{key}",
        path=str(real) if image is not None else None,
        root=str(real.parent),  # the user named this tar: a symlinked shard is fine
        offset=image.offset_data if image is not None else None,
        length=image.size if image is not None else None,
        metadata=metadata_json(source, record),
    )


def _json_object(text: str | None) -> dict[str, Any]:
    """A json member's object; anything unparsable counts as no metadata (the image may be fine)."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def caption_of(source: SourceConfig, text: str | None, record: dict[str, Any]) -> str | None:
    if source.caption_column is not None:
        return clean_caption(record.get(source.caption_column))
    if clean_caption(text) is not None:
        return clean_caption(text)
    return clean_caption(next((record[c] for c in CAPTION_COLUMNS if c in record), None))
