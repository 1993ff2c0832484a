"""bench/bookkeeping.py at a tiny size: the synthesised records are found by the reuse lookups
(the child checks every shard's count against the keys written), the old join agrees, the report
and gc run, and the results land where bench/summary.py reads them."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bookkeeping(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the bench imports its neighbours by plain name
    return importlib.import_module("bookkeeping")


def test_the_bench_at_a_tiny_size(bookkeeping, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SDFLOW_BENCH_RESULTS", str(tmp_path / "results"))
    argv = ["--rows", "2500", "--shard-size", "500", "--lookups", "3", "--old-join-max", "2500",
            "--parts", "reuse", "report", "--workdir", str(tmp_path / "work")]  # fmt: skip
    [result] = bookkeeping.main(argv)
    assert result["rows"] == 2500
    assert result["reuse"]["lookups"] == result["old-join"]["lookups"] == 3
    assert result["reuse"]["first_found"] == 495  # shard 0: 500 keys, 1 in 100 replaced
    assert result["reuse"]["peak_mib"] > 0 and result["report"]["seconds"] > 0
    assert "| 2,500 |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "results" / "bookkeeping.json").read_text())
    cases = [row["case"] for row in saved["rows"]]
    assert "reuse lookup per 1,000-key shard, 2,500 rows" in cases
    assert saved["rows"][0]["peer"] == "in-memory join (before)"
    assert not list((tmp_path / "work").iterdir())  # the synthesised workdir is removed


def test_synthesised_records_point_at_the_rows_they_describe(bookkeeping, tmp_path) -> None:
    import pyarrow.parquet as pq

    manifests = bookkeeping.synthesise(tmp_path, 1200, 500, records_only=False)
    assert manifests["filter"]["counts"]["input"] == 1200
    base = tmp_path / "stages" / "filter" / bookkeeping.FILTER_KEY
    record = pq.read_table(base / "rows" / "shard-00002.parquet").to_pylist()
    assert [r["key"] for r in record] == bookkeeping.shard_keys(2, 200)
    kept = pq.read_table(base / "shard-00002.parquet").column("id").to_pylist()
    failed = pq.read_table(base / "failures" / "shard-00002.parquet").column("id").to_pylist()
    for row, entry in enumerate(record):
        where = failed if entry["file"].startswith("failures/") else kept
        assert where[entry["position"]] == f"2-{row}"


def test_a_synthesised_shard_is_what_the_stages_write(bookkeeping, tmp_path) -> None:
    """The bench builds a shard column-wise; the stages write it row by row (`record_rows`,
    `StageBuild.write_shard`). Given the rows the bench describes, spelled out one at a time here,
    the stages' writers leave the same tables."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sdflow.store.reuse import record_rows
    from sdflow.store.stageio import StageBuild, failures_table

    shard, size, words = 3, 47, bookkeeping.WORDS
    base, caption = tmp_path / "bench", tmp_path / "caption"
    for folder in (base / "rows", base / "failures", caption):
        folder.mkdir(parents=True)
    bookkeeping.write_shard(base, caption, shard, size, records_only=False)
    kinds = [(row // 10) % 3 if row % 10 == 0 else None for row in range(size)]
    check = [{0: "too_small", 1: "aspect_ratio"}.get(kind) for kind in kinds]
    detail = [{0: "8x8 original", 1: "ratio 3.00 > 2.0"}.get(kind) for kind in kinds]
    facts = {"check": check, "check_detail": detail,
             "phash": [str(shard * size + row) for row in range(size)]}  # fmt: skip
    failures = [
        {"id": f"{shard}-{row}", "source": "bench",
         "reason": ("too_small", "aspect_ratio", "duplicate")[kind],
         "detail": (f"8x8 original, shorter side < {16 + row % 7}",
                    f"ratio {2 + (row % 50) // 10}.{row % 10}0 > 2.0", f"{shard % 50}-1")[kind]}
        for row, kind in enumerate(kinds) if kind is not None
    ]  # fmt: skip
    kept = [row for row, kind in enumerate(kinds) if kind is None]
    build = StageBuild(tmp_path / "work", "filter", "k")
    keys = bookkeeping.shard_keys(shard, size)
    types = dict.fromkeys(facts, pa.string())
    record_rows(build, shard, keys, [k is None for k in kinds], facts, types)
    images = [{"id": f"{shard}-{row}", "image": bookkeeping.PNG} for row in kept]
    build.write_shard(shard, pa.Table.from_pylist(images), failures_table(failures))
    name = f"shard-{shard:05d}.parquet"
    for path in (f"rows/{name}", f"failures/{name}", name):
        assert pq.read_table(base / path).equals(pq.read_table(build.path / path)), path
    captioned = [
        {"id": f"{shard}-{row}", "width": 64 + row % 900, "height": 64 + (row * 3) % 700,
         "caption": f"a {words[row % 16]} {words[(row * 7 + shard) % 16]} photo number {row}",
         "image": bookkeeping.PNG}
        for row in kept
    ]  # fmt: skip
    schema = pa.schema({"id": pa.string(), "caption": pa.string(), "width": pa.int32(),
                        "height": pa.int32(), "image": pa.binary()})  # fmt: skip
    assert pq.read_table(caption / name).equals(pa.Table.from_pylist(captioned, schema=schema))
