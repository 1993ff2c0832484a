"""The dataset report holds a bounded amount whatever the row count: histograms from a uniform
sample with the exact count, failure tables streamed shard by shard (the first examples of each
reason, the measured values, the duplicate clusters), clusters pruned to the largest."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from sdflow.data.report import aggregate, render_html
from sdflow.data.report.aggregate import DuplicateClusters, Reservoir
from sdflow.store.stageio import failures_table

SHARDS, ROWS = 6, 400
collect = importlib.import_module("sdflow.data.report.collect")  # the package exports a function


def test_a_reservoir_keeps_a_uniform_sample_and_the_exact_count() -> None:
    small = Reservoir(capacity=1000)
    small.extend(np.arange(300))
    small.extend([7.5])
    assert small.count == 301 and list(small) == [*range(300), 7.5]  # below capacity: every row

    big, again = Reservoir(capacity=1000, seed=3), Reservoir(capacity=1000, seed=3)
    stream = np.arange(100_000, dtype=np.float64)
    for part in np.array_split(stream, 37):
        big.extend(part)
        again.extend(part)
    assert big.count == 100_000 and big.values.shape == (1000, 1)
    assert np.array_equal(big.values, again.values)  # seeded: the same rows, the same sample
    assert len(set(big)) == 1000 and set(big) <= set(stream.tolist())
    # uniform over the stream: mean 49999.5, standard error 28868 / sqrt(1000) = 913
    assert abs(np.mean(big.column()) - 49_999.5) < 4 * 913
    late = np.mean(big.column() >= 50_000)  # rows of the second half are half of the sample
    assert abs(late - 0.5) < 4 * np.sqrt(0.25 / 1000)


def test_clusters_past_the_limit_keep_the_largest_exactly() -> None:
    clusters = DuplicateClusters(prune_at=8)
    rows = []
    for batch in range(30):
        rows = [{"id": f"big-{batch}-{i}", "source": "x", "reason": "duplicate", "detail": "K"}
                for i in range(3)]  # fmt: skip
        rows += [{"id": f"s-{batch}-{i}", "source": "x", "reason": "near_duplicate",
                  "detail": f"single-{batch}-{i} at Hamming distance 2"} for i in range(5)]  # fmt: skip
        clusters.add(failures_table(rows))
        assert len(clusters.groups) <= 8 + 5
    top = clusters.largest(1)[0]
    assert (top.kept, top.size) == ("K", 90)
    assert top.members == [(f"big-0-{i}", "duplicate") for i in range(3)] + [
        (f"big-1-{i}", "duplicate") for i in range(3)
    ]


@pytest.fixture
def outputs(tmp_path: Path) -> tuple[Path, dict]:
    """A filter output (kept shards, failure shards) and a caption output, written by hand."""
    manifests = {}
    for stage in ("filter", "caption"):
        base = tmp_path / "stages" / stage / "k"
        (base / "failures").mkdir(parents=True)
        names = []
        for s in range(SHARDS):
            name = f"shard-{s:05d}.parquet"
            ids = [f"{s}-{j}" for j in range(ROWS)]
            kept = pa.table({"id": ids, "caption": [f"a cat number {j}" for j in range(ROWS)],
                             "width": pa.array([100 + j for j in range(ROWS)], pa.int32()),
                             "height": pa.array([50 + s for _ in range(ROWS)], pa.int32()),
                             "image": [b"x"] * ROWS})  # fmt: skip
            pq.write_table(kept, base / name)
            failed = [{"id": f"f{s}-{j}", "source": "x",
                       "reason": "aspect_ratio" if j % 2 else "too_small",
                       "detail": f"ratio {2 + j / 100:.2f} > 2.0" if j % 2 else "small"}
                      for j in range(s * 2)]  # fmt: skip
            pq.write_table(failures_table(failed), base / "failures" / name)
            names.append(name)
        counts = {"input": SHARDS * ROWS, "kept": SHARDS * ROWS,
                  "failed_by_reason": {"too_small": 15, "aspect_ratio": 15}}  # fmt: skip
        manifests[stage] = {"path": f"stages/{stage}/k", "counts": counts, "shards": names,
                            "files": {"failures": "failures"}}  # fmt: skip
        (base / "MANIFEST.json").write_text(json.dumps(manifests[stage]))
    return tmp_path, manifests


def test_the_report_streams_failures_and_samples_the_rows(outputs, monkeypatch) -> None:
    workdir, manifests = outputs

    def whole_table(*args):
        raise AssertionError("the report read every failure shard into one table")

    monkeypatch.setattr(collect, "read_failures", whole_table, raising=False)
    monkeypatch.setattr(aggregate, "CAPACITY", 100)
    stats = collect.collect(workdir, manifests)
    assert stats.sizes.count == SHARDS * ROWS and stats.sizes.values.shape == (100, 2)
    assert stats.caption_words.count == SHARDS * ROWS and len(list(stats.caption_words)) == 100
    measured = stats.scores["rejected (aspect_ratio): ratio"]
    failures = pa.concat_tables(
        pq.read_table(workdir / "stages/filter/k/failures" / n)
        for n in manifests["filter"]["shards"]
    )  # the reference, read here in one piece
    ratios = failures.filter(pc.equal(failures["reason"], "aspect_ratio"))["detail"].to_pylist()
    assert measured.count == len(ratios) == 15
    assert sorted(measured) == sorted(float(d.split()[1]) for d in ratios)
    examples = {r["reason"]: r["examples"] for r in stats.failures if r["stage"] == "filter"}
    for reason in ("too_small", "aspect_ratio"):
        first = failures.filter(pc.equal(failures["reason"], reason)).slice(0, 3).to_pylist()
        assert examples[reason] == [(r["id"], r["detail"]) for r in first]

    html = render_html(stats, {"width": b"png"})
    assert re.search(rf'id="plot-width" data-n="{SHARDS * ROWS}"', html)
