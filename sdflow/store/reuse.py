"""Incremental stages: a build reuses the rows that earlier builds of the same stage computed.

A data stage computes each output row, kept or failed, from one input row. The row's *key* hashes
that input row's content and everything else that decides its result (the stage's row settings and
code version: the `salt`). Before each shard it writes, a stage records in `rows/<shard>.parquet`
the key of every input row, where its result went (`file`: the kept shard or the failures table;
`position` in it) and the small per-row facts it reports (`extra`, e.g. "this caption was generated").

A later build of the stage, under any stage key (say 1 % of rows were appended upstream, so every key
downstream is new), looks its input rows up in the records of the stage's newest complete outputs and
copies the results of the hits instead of computing them: a rerun costs what was added, removed or
changed, not the dataset. The lookup goes through each searched output's key index on disk
(`sdflow.store.rowindex`, written by the first build that searches it), one shard's keys at a time:
no per-row state is held in memory, and a shard's lookup costs the same however many rows the
outputs recorded. A reused row is the same bytes a fresh computation gives, and every shard
is written the same way whichever way its rows came, so the output and its fingerprint equal those of
a build from scratch. A row the stage does not want remembered (a timeout that may pass tomorrow) is
recorded without a key, and is computed again next time.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sdflow.store.rowindex import ROWS, RowIndex
from sdflow.store.stageio import (
    FAILURES,
    MANIFEST,
    SCHEMA_VERSION,
    StageBuild,
    failures_table,
    shard_name,
)

KEY = pa.binary(16)
NEWEST_OUTPUTS = 4  # how many earlier outputs of a stage are searched for rows


@dataclass
class Outcome:
    """One input row's result: a kept output row, or a failure record {id, source, reason, detail}."""

    kept: bool
    row: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    remember: bool = True


def row_keys(rows: Sequence[Any], salt: str) -> list[bytes | None]:
    """One key per row: a hash of `salt` and the row's JSON-able content (bytes by their hash);
    None for a row given as None (one that must always be computed)."""
    keys: list[bytes | None] = []
    for row in rows:
        if row is None:
            keys.append(None)
            continue
        digest = hashlib.sha256(salt.encode() + b"\0")
        digest.update(json.dumps(row, sort_keys=True, default=_digestible).encode())
        keys.append(digest.digest()[: KEY.byte_width])
    return keys


def _digestible(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return "sha256:" + hashlib.sha256(value).hexdigest()
    raise TypeError(f"cannot key a row field of type {type(value).__name__}")


class Memo:
    """The recorded rows of a stage's newest complete outputs (other than `exclude`), by key.

    Nothing per row is held: each lookup searches the outputs' on-disk key indexes
    (`sdflow.store.rowindex`, built on first use) and reads just the records it hits."""

    def __init__(self, workdir: str | Path, stage: str, exclude: str | None = None):
        self.outputs = _newest_outputs(Path(workdir) / "stages" / stage, exclude)
        self._indexes: list[RowIndex] | None = None
        self._lock = threading.Lock()

    def outcomes(
        self,
        keys: Sequence[bytes | None],
        compute: Callable[[list[int]], list[Outcome]],
        read: Callable[[str], Any] | None = None,
    ) -> tuple[list[Outcome], int]:
        """Every row's outcome, in input order: earlier results where recorded, else from
        `compute(rows)` (called once, with the indices of the rows nobody computed yet; it returns
        their outcomes in that order). Also returns how many rows were computed.

        `read(path)` opens a kept file of an earlier output as a sequence of row dicts (default:
        a parquet shard); failures are always parquet."""
        found = self._find(keys)
        todo = [row for row in range(len(keys)) if row not in found]
        computed = compute(todo) if todo else []
        if len(computed) != len(todo):
            raise ValueError(f"compute returned {len(computed)} outcomes for {len(todo)} rows")
        outcomes: list[Outcome | None] = [None] * len(keys)
        for row, outcome in zip(todo, computed, strict=True):
            outcomes[row] = outcome
        for row, outcome in _read(found, read or ParquetRows).items():
            outcomes[row] = outcome
        return outcomes, len(todo)  # type: ignore[return-value]

    def facts(self, keys: Sequence[bytes | None]) -> dict[int, dict[str, Any]]:
        """Row index -> the `extra` facts recorded for it, for the keys some output recorded
        (for stages whose per-row work is a verdict, not a new row: the filter's checks)."""
        return {row: _extra(record) for row, record in self._find(keys).items()}

    def _find(self, keys: Sequence[bytes | None]) -> dict[int, dict[str, Any]]:
        """Row index -> its record in the newest output that has its key."""
        rows_of: dict[bytes, list[int]] = {}
        for row, key in enumerate(keys):
            if key is not None:
                rows_of.setdefault(key, []).append(row)
        if not rows_of or not self.outputs:
            return {}
        hits: dict[bytes, tuple[int, str, int]] = {}  # key -> (output, record file, row)
        for newest, index in enumerate(self._open()):
            missing = [key for key in rows_of if key not in hits]
            for key, (record, position) in index.lookup(missing).items():
                hits[key] = (newest, record, position)
        return _records(hits, rows_of, self.outputs)

    def _open(self) -> list[RowIndex]:
        with self._lock:  # the first shard job indexes the outputs; the others wait for it
            if self._indexes is None:
                self._indexes = [RowIndex(base) for base in self.outputs]
            return self._indexes


def _records(
    hits: dict[bytes, tuple[int, str, int]], rows_of: dict[bytes, list[int]], outputs: list[Path]
) -> dict[int, dict[str, Any]]:
    """The records `hits` point to, one read per record file, each row's `file` made absolute
    and tagged with its output's age (`newest`)."""
    by_file: dict[tuple[int, str], list[bytes]] = {}
    for key, (newest, record, _) in hits.items():
        by_file.setdefault((newest, record), []).append(key)
    found: dict[int, dict[str, Any]] = {}
    for (newest, record), keys in by_file.items():
        base = outputs[newest]
        positions = pa.array([hits[key][2] for key in keys], pa.int64())
        for key, entry in zip(
            keys, pq.read_table(base / ROWS / record).take(positions).to_pylist(), strict=True
        ):
            entry["file"] = str(base / entry["file"])
            entry["newest"] = newest
            for row in rows_of[key]:
                found[row] = dict(entry)
    return found


def _read(found: dict[int, dict[str, Any]], read: Callable[[str], Any]) -> dict[int, Outcome]:
    """The earlier results `found` points to, one read per file."""
    by_file: dict[str, list[int]] = {}
    for row, record in found.items():
        by_file.setdefault(record["file"], []).append(row)
    outcomes = {}
    for path, rows in by_file.items():
        failed = Path(path).parent.name == FAILURES
        values = ParquetRows(path) if failed else read(path)
        for row in rows:
            record = found[row]
            outcomes[row] = Outcome(not failed, values[record["position"]], _extra(record))
    return outcomes


class ParquetRows:
    """A parquet file's rows as dicts, by position."""

    def __init__(self, path: str | Path):
        self.table = pq.read_table(path)

    def __getitem__(self, position: int) -> dict[str, Any]:
        return self.table.slice(position, 1).to_pylist()[0]


def _extra(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in {"key", "file", "position", "newest"}}


def write_outcomes(
    build: StageBuild,
    index: int,
    keys: Sequence[bytes],
    outcomes: Sequence[Outcome],
    schema: pa.Schema,
    extra: dict[str, pa.DataType] | None = None,
) -> pa.Table:
    """Write shard `index` from its rows' outcomes (record, failures, kept rows last, so a shard on
    disk means all three are). Returns the kept table."""
    remembered = [k if o.remember else None for k, o in zip(keys, outcomes, strict=True)]
    facts = {name: [o.extra.get(name) for o in outcomes] for name in extra or {}}
    record_rows(build, index, remembered, [o.kept for o in outcomes], facts, extra)
    kept = pa.Table.from_pylist([o.row for o in outcomes if o.kept], schema=schema)
    build.write_shard(index, kept, failures_table([o.row for o in outcomes if not o.kept]))
    return kept


def record_rows(
    build: StageBuild,
    index: int,
    keys: Sequence[bytes | None],
    kept: Sequence[bool],
    facts: dict[str, list[Any]] | None = None,
    types: dict[str, pa.DataType] | None = None,
    names: tuple[str, str] | None = None,
) -> None:
    """Write the record of shard `index`, before the shard itself: each input row's key (None:
    not to be reused), where its result is (kept shard or failures table, position in it, in
    input order) and its `facts`. `names`: the kept and failures files, if not the shard's."""
    name = shard_name(index)
    kept_file, failed_file = names or (name, f"{FAILURES}/{name}")
    files, positions, counts = [], [], [0, 0]
    for is_kept in kept:
        files.append(kept_file if is_kept else failed_file)
        positions.append(counts[0 if is_kept else 1])
        counts[0 if is_kept else 1] += 1
    columns = {
        "key": pa.array(keys, KEY),
        "file": pa.array(files, pa.string()),
        "position": pa.array(positions, pa.int32()),
    }
    for column, values in (facts or {}).items():
        columns[column] = pa.array(values, (types or {}).get(column))
    record = Path(kept_file.replace("/", "-")).with_suffix(".parquet").name
    build.write_table(f"{ROWS}/{record}", pa.table(columns))


def _newest_outputs(root: Path, exclude: str | None) -> list[Path]:
    """Complete outputs under `root` that recorded their rows, newest first."""
    found = []
    for manifest in root.glob(f"*/{MANIFEST}"):
        base = manifest.parent
        if base.name == exclude or not (base / ROWS).is_dir():
            continue
        try:
            version = json.loads(manifest.read_text()).get("schema_version")
        except (OSError, ValueError):
            continue
        if version == SCHEMA_VERSION:
            found.append((manifest.stat().st_mtime_ns, base))
    return [base for _, base in sorted(found, reverse=True)[:NEWEST_OUTPUTS]]


_SHARED: dict[tuple[str, str, str | None], Memo] = {}
_SHARED_LOCK = threading.Lock()


def shared_memo(workdir: str | Path, stage: str, build_key: str | None) -> Memo:
    """This process's memo for one build (its shard jobs share it; a new build gets a new one)."""
    key = (str(workdir), stage, build_key)
    with _SHARED_LOCK:
        if key not in _SHARED:
            for old in [k for k in _SHARED if k[:2] == key[:2]]:
                del _SHARED[old]
            _SHARED[key] = Memo(workdir, stage, exclude=build_key)
        return _SHARED[key]
