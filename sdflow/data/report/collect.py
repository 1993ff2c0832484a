"""What the dataset report shows, read from the data stages' manifests and shards.

Counts come from the manifests; everything else from the shards and failure tables, one shard at a
time and only the columns a figure needs, so the memory the report needs does not grow with the
rows (the aggregates are in `aggregate`): the numbers a histogram is drawn from (original width and
height, caption length, metadata scores, values the filter measured) are a uniform sample of at
most `aggregate.CAPACITY` rows per figure with the exact row count, at most `aggregate.MAX_SERIES`
score series; the word and bigram counters are pruned to their most frequent entries when they
pass `PRUNE_AT` distinct keys, the duplicate clusters to the largest when they pass
`aggregate.CLUSTER_PRUNE_AT` kept samples (so, on a dataset with more clusters than that, a shown
cluster's size can be short); failure examples are the first `EXAMPLES` per reason; thumbnails are
bounded (`SAMPLES` samples, `CLUSTERS` duplicate clusters of at most `CLUSTER_SIZE` members).
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sdflow.data.report.aggregate import (
    CLUSTERS,
    Cluster,
    DuplicateClusters,
    MeasuredScores,
    Reservoir,
    ScoreSeries,
    duplicate_clusters,  # noqa: F401  (re-exported: the report's API)
    measured_scores,  # noqa: F401
)
from sdflow.store.stageio import FAILURES, Manifest, output_dir, read_shards, shard_paths

DATA_STAGES = ("download", "filter", "caption")
SAMPLES = 48
TOP_TERMS = 30
EXAMPLES = 3  # failure examples shown per reason
PRUNE_AT = 200_000
WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
STOPWORD_TEXT = (
    "a an the and or of in on at to for with by from as is are was were be been it its this that "
    "these those there their his her he she they them we you i my our your into over under up "
    "down out off than then so but not no has have had do does did will would can could"
)
STOPWORDS = frozenset(STOPWORD_TEXT.split())

Funnel = list[tuple[str, str, int]]  # (step, stage, rows)


@dataclass
class DataStats:
    funnel: Funnel
    failures: list[dict]  # stage, reason, count, share, examples [(id, detail)]
    final_stage: str
    sizes: Reservoir = field(default_factory=lambda: Reservoir(width=2))  # original width, height
    caption_words: Reservoir = field(default_factory=Reservoir)
    words: Counter[str] = field(default_factory=Counter)
    bigrams: Counter[str] = field(default_factory=Counter)
    scores: dict[str, Reservoir] = field(default_factory=dict)  # title -> values
    clusters: list[Cluster] = field(default_factory=list)
    cluster_images: dict[str, bytes] = field(default_factory=dict)  # id -> image bytes
    samples: list[dict] = field(default_factory=list)  # id, caption, image (bytes)


def collect(workdir: str | Path, manifests: Mapping[str, Manifest | None]) -> DataStats:
    """Everything the report needs from the data stages present in `manifests`."""
    present = {n: m for n, m in manifests.items() if m is not None}
    final = next(n for n in reversed(DATA_STAGES) if n in present)
    stats = DataStats(funnel(present), failure_rows(workdir, present), final)
    add_rows(stats, workdir, present[final])
    if "download" in present:
        stats.scores.update(metadata_scores(workdir, present["download"]))
    if "filter" in present:
        measured, duplicates = MeasuredScores(), DuplicateClusters()
        for failures in failure_shards(workdir, present["filter"]):
            measured.add(failures)
            duplicates.add(failures)
        stats.scores.update(measured.series())
        clusters = duplicates.largest(CLUSTERS)
        images = images_by_id(workdir, present.get("download") or present["filter"], clusters)
        stats.clusters = [c for c in clusters if c.kept in images]
        for cluster in stats.clusters:
            cluster.members = [m for m in cluster.members if m[0] in images]
        stats.cluster_images = images
    stats.samples = sample_rows(workdir, present[final], SAMPLES)
    return stats


def funnel(present: Mapping[str, Manifest]) -> Funnel:
    """rows in → downloaded → kept by filter → captioned → encoded, for the stages present."""
    steps = [
        ("rows in", "download", "input"),
        ("downloaded", "download", "kept"),
        ("kept by filter", "filter", "kept"),
        ("captioned", "caption", "kept"),
        ("encoded", "latents", "encoded"),
    ]
    return [
        (step, stage, present[stage]["counts"][count])
        for step, stage, count in steps
        if stage in present and count in present[stage].get("counts", {})
    ]


def failure_rows(workdir: str | Path, present: Mapping[str, Manifest]) -> list[dict]:
    """Each stage's failures by reason, most frequent first, with a few examples each."""
    rows = []
    for stage, manifest in present.items():
        counts = manifest.get("counts", {})
        reasons = counts.get("failed_by_reason") or {}
        if not reasons:
            continue
        examples: dict[str, list[tuple[str, str]]] = {}
        if "failures" in manifest.get("files", {}):
            examples = failure_examples(workdir, manifest, reasons)
        total = counts.get("input") or 0
        for reason, count in sorted(reasons.items(), key=lambda item: (-item[1], item[0])):
            share = f"{100 * count / total:.1f}%" if total else "-"
            rows.append(
                {"stage": stage, "reason": reason, "count": count, "share": share,
                 "examples": examples.get(reason, [])}
            )  # fmt: skip
    return rows


def failure_shards(
    workdir: str | Path, manifest: Manifest, columns: Iterable[str] = ("id", "reason", "detail")
) -> Iterator[pa.Table]:
    """A stage's failure tables, one shard at a time."""
    for path in sorted((output_dir(workdir, manifest) / FAILURES).glob("shard-*.parquet")):
        yield pq.read_table(path, columns=list(columns))


def failure_examples(
    workdir: str | Path, manifest: Manifest, reasons: Iterable[str]
) -> dict[str, list[tuple[str, str]]]:
    """The first `EXAMPLES` failures (id, detail) of each reason, reading shards until found."""
    examples: dict[str, list[tuple[str, str]]] = {reason: [] for reason in reasons}
    for table in failure_shards(workdir, manifest):
        for reason, found in examples.items():
            if len(found) < EXAMPLES:
                rows = table.filter(pc.equal(table.column("reason"), reason))
                rows = rows.slice(0, EXAMPLES - len(found)).to_pylist()
                found.extend((r["id"], r["detail"] or "") for r in rows)
        if all(len(found) >= EXAMPLES for found in examples.values()):
            break
    return examples


def add_rows(stats: DataStats, workdir: str | Path, manifest: Manifest) -> None:
    """Original sizes, caption lengths, words and bigrams of the rows of `manifest`."""
    for table in read_shards(workdir, manifest, columns=_present_columns(workdir, manifest)):
        widths = _original(table, "width").to_numpy(zero_copy_only=False)
        heights = _original(table, "height").to_numpy(zero_copy_only=False)
        stats.sizes.extend(np.column_stack([widths, heights]))
        lengths = []
        for caption in table.column("caption").to_pylist():
            words = caption_words(caption)
            lengths.append(len(words))
            stats.words.update(w for w in words if w not in STOPWORDS)
            stats.bigrams.update(
                f"{a} {b}"
                for a, b in zip(words, words[1:], strict=False)
                if a not in STOPWORDS and b not in STOPWORDS
            )
        stats.caption_words.extend(lengths)
        _prune(stats.words)
        _prune(stats.bigrams)


def caption_words(caption: str | None) -> list[str]:
    return WORD.findall((caption or "").lower())


def _present_columns(workdir: str | Path, manifest: Manifest) -> list[str]:
    paths = shard_paths(workdir, manifest)
    names = set(pq.read_schema(paths[0]).names) if paths else set()
    wanted = ("width", "height", "orig_width", "orig_height", "caption")
    return [c for c in wanted if c in names]


def _original(table: pa.Table, side: str) -> pa.Array:
    """Size before the download resize; the stored size where the source did not record it."""
    stored = table.column(side)
    if f"orig_{side}" not in table.column_names:
        return stored
    return pc.coalesce(table.column(f"orig_{side}"), stored)


def _prune(counter: Counter[str]) -> None:
    if len(counter) > PRUNE_AT:
        kept = counter.most_common(PRUNE_AT // 4)
        counter.clear()
        counter.update(dict(kept))


def metadata_scores(workdir: str | Path, manifest: Manifest) -> dict[str, Reservoir]:
    """Numeric fields of the shards' `metadata` JSON column (similarity, pwatermark, ...)."""
    paths = shard_paths(workdir, manifest)
    if not paths or "metadata" not in pq.read_schema(paths[0]).names:
        return {}
    scores = ScoreSeries()
    for table in read_shards(workdir, manifest, columns=["metadata"]):
        values: dict[str, list[float]] = defaultdict(list)
        for text in table.column("metadata").drop_null().to_pylist():
            for name, value in json.loads(text).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    values[f"metadata: {name}"].append(float(value))
        scores.extend(values)
    return scores.series()


def images_by_id(
    workdir: str | Path, manifest: Manifest, clusters: Iterable[Cluster]
) -> dict[str, bytes]:
    """The image bytes of the clusters' samples, read shard by shard, those rows only."""
    wanted = {c.kept for c in clusters} | {m for c in clusters for m, _ in c.members}
    found: dict[str, bytes] = {}
    if not wanted:
        return found
    ids = pa.array(sorted(wanted), pa.string())
    for path in shard_paths(workdir, manifest):
        if not pc.any(pc.is_in(pq.read_table(path, columns=["id"]).column("id"), ids)).as_py():
            continue  # a shard's image column is read only when it holds a wanted row
        table = pq.read_table(path, columns=["id", "image"], filters=pc.field("id").isin(ids))
        found.update(
            zip(table.column("id").to_pylist(), table.column("image").to_pylist(), strict=True)
        )
        if len(found) == len(wanted):
            break
    return found


def sample_rows(workdir: str | Path, manifest: Manifest, count: int) -> list[dict]:
    """`count` rows spread evenly over the stage's shards: id, caption and image bytes."""
    paths = shard_paths(workdir, manifest)
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in paths]
    total = sum(sizes)
    chosen = sorted({i * total // count for i in range(count)} if total else set())
    rows, start = [], 0
    for path, size in zip(paths, sizes, strict=True):
        local = [i - start for i in chosen if start <= i < start + size]
        if local:
            table = pq.read_table(path, columns=["id", "caption", "image"])
            rows.extend(table.take(pa.array(local, pa.int64())).to_pylist())
        start += size
    return rows
