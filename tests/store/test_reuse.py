"""Row reuse through each output's on-disk key index: the record a lookup finds (newest output,
first record of a repeated key, none for an unremembered row), that a lookup reads only the records
it hits, that the index stays out of the fingerprint, and the index's byte search stays aligned."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdflow.store import reuse, rowindex
from sdflow.store.rowindex import RowIndex
from sdflow.store.stageio import MANIFEST, ROWS_INDEX, SCHEMA_VERSION, content_fingerprint


def key(n: int) -> bytes:
    return n.to_bytes(16, "big") if n < 256 else (n * 2654435761 % 2**128).to_bytes(16, "big")


def write_output(
    workdir: Path, name: str, records: list[list[bytes | None]], mtime: int, stage: str = "s"
) -> Path:
    """A published output of `stage` whose record file i holds the keys `records[i]` (every row
    kept, at its own position), each row's fact `tag` = "<name>:<file>:<row>"."""
    base = workdir / "stages" / stage / name
    (base / "rows").mkdir(parents=True)
    for i, keys in enumerate(records):
        shard = f"shard-{i:05d}.parquet"
        table = pa.table({
            "key": pa.array(keys, pa.binary(16)),
            "file": [shard] * len(keys),
            "position": pa.array(range(len(keys)), pa.int32()),
            "tag": [f"{name}:{i}:{row}" for row in range(len(keys))],
        })  # fmt: skip
        pq.write_table(table, base / "rows" / shard)
    (base / MANIFEST).write_text(json.dumps({"schema_version": SCHEMA_VERSION}))
    os.utime(base / MANIFEST, ns=(mtime, mtime))
    return base


def test_lookup_finds_the_newest_output_and_the_first_record_of_a_key(tmp_path: Path) -> None:
    old = [[key(n) for n in range(0, 300)], [key(n) for n in range(300, 600)]]
    new = [[key(n) for n in range(500, 700)] + [key(510), None]]  # 510 twice; a None row
    write_output(tmp_path, "old", old, mtime=1)
    write_output(tmp_path, "new", new, mtime=2)
    wanted = [key(5), key(550), key(510), key(999), None, key(650), key(5)]
    facts = reuse.Memo(tmp_path, "s", exclude="this-build").facts(wanted)
    # recomputed from what was written: the newest output that has the key, its first row
    assert facts == {
        0: {"tag": "old:0:5"},
        1: {"tag": "new:0:50"},
        2: {"tag": "new:0:10"},
        5: {"tag": "new:0:150"},
        6: {"tag": "old:0:5"},
    }
    assert reuse.Memo(tmp_path, "s", exclude="new").facts(wanted)[1] == {"tag": "old:1:250"}


def test_a_lookup_reads_only_the_records_it_hits(tmp_path: Path, monkeypatch) -> None:
    shards = [[key(1000 * s + n) for n in range(100)] for s in range(40)]
    base = write_output(tmp_path, "old", shards, mtime=1)
    RowIndex(base).close()  # an earlier build indexed the output
    read = []
    real = pq.read_table
    monkeypatch.setattr(
        reuse.pq, "read_table", lambda path, **kw: read.append(path) or real(path, **kw)
    )
    memo = reuse.Memo(tmp_path, "s", exclude="this-build")
    facts = memo.facts([key(7000 + n) for n in range(100)] + [key(123456789)])
    assert len(facts) == 100 and facts[3] == {"tag": "old:7:3"}
    assert read == [base / "rows" / "shard-00007.parquet"]  # not the 39 other record files


def test_the_index_is_written_once_and_is_not_content(tmp_path: Path) -> None:
    base = write_output(tmp_path, "old", [[key(n) for n in range(50)]], mtime=1)
    before = content_fingerprint(base)
    (base / f".{ROWS_INDEX}.dead1234.tmp" / "spill").mkdir(parents=True)  # a killed builder's
    assert reuse.Memo(tmp_path, "s").facts([key(3)]) == {0: {"tag": "old:0:3"}}
    assert (base / ROWS_INDEX / "meta.json").is_file()
    assert content_fingerprint(base) == before
    assert not list(base.glob(".*.tmp"))
    stamp = (base / ROWS_INDEX / "entries.bin").stat().st_mtime_ns
    reuse.Memo(tmp_path, "s").facts([key(4)])
    assert (base / ROWS_INDEX / "entries.bin").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("recorded", [False, True])
def test_a_key_inside_two_neighbouring_entries_is_no_match(tmp_path: Path, recorded: bool) -> None:
    """Entries are 16 key bytes + record (u32) + row (u32): a key can appear in the index's bytes
    across an entry boundary. Here key A's second half plus its record 1, row 5 spell key K."""
    k = bytes([0x42] * 8) + (1).to_bytes(4, "little") + (5).to_bytes(4, "little")
    a = bytes([0x42] + [0] * 7) + k[:8]
    second = [key(900 + n) for n in range(5)] + [a]  # A at record 1, row 5
    base = write_output(tmp_path, "old", [[k] if recorded else [key(777)], second], mtime=1)
    index = RowIndex(base)
    assert index.lookup([a]) == {a: ("shard-00001.parquet", 5)}
    assert index.lookup([k]) == ({k: ("shard-00000.parquet", 0)} if recorded else {})


def test_every_recorded_key_is_found_across_partitions_and_slots(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(rowindex, "SPILL_ROWS", 700)  # several spills
    keys = [key(n) for n in range(256, 3256)] + [bytes(16), b"\xff" * 16]
    shards = [keys[i : i + 500] for i in range(0, len(keys), 500)]
    index = RowIndex(write_output(tmp_path, "old", shards, mtime=1))
    found = index.lookup(keys + [key(10**9)])
    expected = {k: (f"shard-{i // 500:05d}.parquet", i % 500) for i, k in enumerate(keys)}
    assert found == expected
