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
