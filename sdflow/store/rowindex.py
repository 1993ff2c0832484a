"""The reuse index of a published stage output: its recorded row keys, sorted, on disk.

`sdflow.store.reuse` records each shard's rows in `rows/<shard>.parquet`, in input order. To find a
new build's input rows among an earlier output's records without reading them all (or holding them
in memory), the first later build that searches an output writes `rows-index/` into it:

- `entries.bin`: every recorded key with where it was recorded (record file number, row in it),
  24 bytes each, sorted by key; a key recorded twice keeps its first record (record files in name
  order, rows in order);
- `offsets.bin`: for each value of the keys' first `bits` bits, where its entries start;
- `records.bin`: the record file names, fixed width; `meta.json`: the sizes.

A lookup reads two small ranges per key with `os.pread` (no memory map: the process's resident
memory does not grow with the index), so a shard's lookup costs the same at a thousand rows
recorded as at a hundred million. Building the index is an external sort in bounded memory:
entries are spilled into `PARTITIONS` files by their key's first byte (keys are hashes, so the
partitions are even), then each partition is sorted and appended.

The index is derived from the output's records, which never change once published, so it is never
stale. It is written beside its final place and renamed there (a crash leaves `.*.tmp` debris that
gc removes), under the output's stage lock (so gc leaves the output alone meanwhile), and it is
not part of the output's fingerprint (`stageio.ROWS_INDEX`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdflow.store.stageio import ROWS_INDEX, fsync_dir, publish, stage_lock

VERSION = 1
ROWS = "rows"
KEY_BYTES = 16
ENTRY = np.dtype([("hi", ">u8"), ("lo", ">u8"), ("record", "<u4"), ("row", "<u4")])
OFFSET = np.dtype("<u8")
SLOT = struct.Struct("<QQ")  # a slot's first entry and the next slot's
WHERE = struct.Struct("<II")  # an entry's record and row
PARTITIONS = 256  # spill files of the build, one per first key byte
SPILL_ROWS = 1 << 20  # entries buffered before they are spilled (24 MiB)
PER_SLOT = 64  # entries per offsets slot, on average


class RowIndex:
    """The key index of one published output (built on first use); lookups are thread-safe."""

    def __init__(self, base: str | Path):
        self._fds: list[int] = []
        self.base = Path(base)
        folder = ensure_index(self.base)
        meta = json.loads((folder / "meta.json").read_text())
        self.entries_count: int = meta["entries"]
        self.bits: int = meta["bits"]
        self.name_width: int = meta["name_width"]
        self._fds = [os.open(folder / name, os.O_RDONLY) for name in FILES]
        if hasattr(os, "posix_fadvise"):  # a lookup's reads are random: no readahead
            for fd in self._fds[:2]:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    def lookup(self, keys: Iterable[bytes]) -> dict[bytes, tuple[str, int]]:
        """key -> (record file name under rows/, row in it), for the keys this output recorded."""
        found: dict[bytes, tuple[int, int]] = {}
        for key in keys:
            hit = self._find(key)
            if hit is not None:
                found[key] = hit
        names = {record: self._name(record) for record in {r for r, _ in found.values()}}
        return {key: (names[record], row) for key, (record, row) in found.items()}

    def _find(self, key: bytes) -> tuple[int, int] | None:
        """(record, row) of `key`: its slot's range of entries, searched for the key's bytes (an
        entry starts with the key's 16 bytes, as `hi` and `lo` are big-endian)."""
        if not self.entries_count:
            return None
        entries, offsets, _ = self._fds
        slot = int.from_bytes(key[:8], "big") >> (64 - self.bits)
        start, end = SLOT.unpack(os.pread(offsets, SLOT.size, slot * OFFSET.itemsize))
        span = os.pread(entries, (end - start) * ENTRY.itemsize, start * ENTRY.itemsize)
        at = span.find(key)
        while at >= 0 and at % ENTRY.itemsize:
            at = span.find(key, at + 1)
        return WHERE.unpack_from(span, at + KEY_BYTES) if at >= 0 else None

    def _name(self, record: int) -> str:
        raw = os.pread(self._fds[2], self.name_width, record * self.name_width)
        return raw.rstrip(b"\0").decode()


FILES = ("entries.bin", "offsets.bin", "records.bin")


def ensure_index(base: Path) -> Path:
    """`base/rows-index/`, written first if absent (or of an older layout)."""
    folder = base / ROWS_INDEX
    if _current(folder):
        return folder
    with stage_lock(base):  # one builder at a time; gc leaves the output alone meanwhile
        if _current(folder):
            return folder
        for debris in base.glob(f".{ROWS_INDEX}.*.tmp"):  # of a build a crash interrupted
            shutil.rmtree(debris, ignore_errors=True)
        tmp = base / f".{ROWS_INDEX}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()
        try:
            write_index(base / ROWS, tmp)
            if folder.exists():  # an older layout
                shutil.rmtree(folder)
            publish(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _current(folder: Path) -> bool:
    try:
        return json.loads((folder / "meta.json").read_text()).get("version") == VERSION
    except (OSError, ValueError):
        return False


def write_index(rows: Path, folder: Path) -> None:
    """Index the record files in `rows` into `folder` (see the module docstring)."""
    names = sorted(n for n in os.listdir(rows) if n.endswith(".parquet")) if rows.is_dir() else []
    width = max((len(n.encode()) for n in names), default=1)
    with open(folder / "records.bin", "wb") as out:
        for name in names:
            out.write(name.encode().ljust(width, b"\0"))
    spill = folder / "spill"
    spill.mkdir()
    count = _spill(rows, names, spill)
    bits = max(8, min(40, math.ceil(math.log2(max(count, 1) / PER_SLOT))))
    _merge(spill, folder, bits)
    shutil.rmtree(spill)
    meta = {"version": VERSION, "entries": count, "bits": bits, "name_width": width}
    (folder / "meta.json").write_text(json.dumps(meta))
    for name in [*FILES, "meta.json"]:
        with open(folder / name, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(folder)


def _spill(rows: Path, names: list[str], spill: Path) -> int:
    """Append every recorded key's entry to its partition's spill file; returns how many."""
    buffered: list[np.ndarray] = []
    pending = count = 0
    outs = [open(spill / f"{p:03d}", "wb") for p in range(PARTITIONS)]  # noqa: SIM115
    try:
        for record, name in enumerate(names):
            entries = record_entries(pq.read_table(rows / name, columns=["key"]), record)
            buffered.append(entries)
            pending += len(entries)
            if pending >= SPILL_ROWS:
                count += _flush(buffered, outs)
                buffered, pending = [], 0
        count += _flush(buffered, outs)
    finally:
        for out in outs:
            out.close()
    return count


def record_entries(table: pa.Table, record: int) -> np.ndarray:
    """The entries of one record file: its non-null keys with their record number and row."""
    keys = table.column("key").combine_chunks()
    if len(keys) == 0:
        return np.empty(0, ENTRY)
    raw = np.frombuffer(keys.buffers()[1], np.uint8, len(keys) * KEY_BYTES, keys.offset * KEY_BYTES)
    halves = raw.view(">u8").reshape(-1, 2)
    valid = keys.is_valid().to_numpy(zero_copy_only=False)
    entries = np.empty(len(keys), ENTRY)
    entries["hi"], entries["lo"] = halves[:, 0], halves[:, 1]
    entries["record"], entries["row"] = record, np.arange(len(keys))
    return entries[valid]


def _flush(buffered: list[np.ndarray], outs: list) -> int:
    if not buffered:
        return 0
    entries = np.concatenate(buffered).astype(ENTRY)  # concatenate makes the order native
    part = (entries["hi"] >> np.uint64(56)).astype(np.intp)
    order = np.argsort(part, kind="stable")  # keeps record order within a partition
    bounds = np.searchsorted(part[order], np.arange(PARTITIONS + 1))
    for p in range(PARTITIONS):
        if bounds[p] < bounds[p + 1]:
            outs[p].write(entries[order[bounds[p] : bounds[p + 1]]].tobytes())
    return len(entries)


def _merge(spill: Path, folder: Path, bits: int) -> None:
    """Sort each partition by key (first record of a key kept) into entries.bin and write the
    start of each slot (the keys' first `bits` bits) into offsets.bin."""
    per_partition = 1 << (bits - 8)
    written = 0
    with open(folder / "entries.bin", "wb") as entries, open(folder / "offsets.bin", "wb") as offs:
        for p in range(PARTITIONS):
            part = np.fromfile(spill / f"{p:03d}", ENTRY)
            hi, lo = part["hi"].astype(np.uint64), part["lo"].astype(np.uint64)
            order = np.lexsort((lo, hi))  # stable: the first record of a key comes first
            part, hi, lo = part[order], hi[order], lo[order]
            first = np.ones(len(part), bool)
            first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
            part, hi = part[first], hi[first]
            slots = (hi >> np.uint64(64 - bits)).astype(np.int64)
            starts = np.searchsorted(slots, np.arange(p * per_partition, (p + 1) * per_partition))
            offs.write((starts + written).astype(OFFSET).tobytes())
            entries.write(part.astype(ENTRY, copy=False).tobytes())
            written += len(part)
        offs.write(np.array([written], OFFSET).tobytes())
