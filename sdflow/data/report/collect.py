"""What the dataset report shows, read from the data stages' manifests and shards.

Counts come from the manifests; everything else from the shards, one shard at a time and only the
columns a figure needs. Per row the report keeps a few numbers (original width and height, caption
length, metadata scores: 4 or 8 bytes each); the word and bigram counters are pruned to their most
frequent entries when they pass `PRUNE_AT` distinct keys; thumbnails are bounded (`SAMPLES` samples,
`CLUSTERS` duplicate clusters of at most `CLUSTER_SIZE` members).
"""

from __future__ import annotations

import json
import re
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sdflow.store.stageio import Manifest, read_failures, read_shards, shard_paths

DATA_STAGES = ("download", "filter", "caption")
# failure detail: the kept twin's id, alone or as "<id> at <measure> <value>"
DUPLICATE_REASONS = ("duplicate", "near_duplicate", "semantic_duplicate")
TWIN = re.compile(r"(?P<id>.+?) at (?P<measure>[A-Za-z ]+?) (?P<value>-?\d+(?:\.\d+)?(?:e-?\d+)?)")
SAMPLES = 48
CLUSTERS = 16
CLUSTER_SIZE = 6
TOP_TERMS = 30
EXAMPLES = 3  # failure examples shown per reason
PRUNE_AT = 200_000
BATCH = 10_000  # failure rows turned into Python objects at a time
WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# "<name> <measured> <op> [<word>] <threshold>", e.g. "ratio 5.00 > 2.0", "similarity 0.21 < min 0.28"
MEASURED = re.compile(
    r"([A-Za-z_][\w.]*)[ =:]+(-?\d+(?:\.\d+)?(?:e-?\d+)?)\s*[<>]=?\s*(?:[A-Za-z_]+\s+)?-?\d"
)
STOPWORD_TEXT = (
    "a an the and or of in on at to for with by from as is are was were be been it its this that "
    "these those there their his her he she they them we you i my our your into over under up "
    "down out off than then so but not no has have had do does did will would can could"
)
STOPWORDS = frozenset(STOPWORD_TEXT.split())

Funnel = list[tuple[str, str, int]]  # (step, stage, rows)


@dataclass
class Cluster:
    """A kept sample and the samples the filter dropped as its (near-)duplicates."""

    kept: str
    members: list[tuple[str, str]]  # (id, reason)
    size: int  # all members, also those not shown


@dataclass
class DataStats:
    funnel: Funnel
    failures: list[dict]  # stage, reason, count, share, examples [(id, detail)]
    final_stage: str
    widths: array = field(default_factory=lambda: array("i"))
    heights: array = field(default_factory=lambda: array("i"))
    caption_words: array = field(default_factory=lambda: array("i"))
    words: Counter[str] = field(default_factory=Counter)
    bigrams: Counter[str] = field(default_factory=Counter)
    scores: dict[str, array] = field(default_factory=dict)  # title -> values
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
        failures = read_failures(workdir, present["filter"])
        stats.scores.update(measured_scores(failures))
        clusters = duplicate_clusters(failures)
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
            table = read_failures(workdir, manifest)
            for reason in reasons:
                first = table.filter(pc.equal(table.column("reason"), reason)).slice(0, EXAMPLES)
                examples[reason] = [(r["id"], r["detail"] or "") for r in first.to_pylist()]
        total = counts.get("input") or 0
        for reason, count in sorted(reasons.items(), key=lambda item: (-item[1], item[0])):
            share = f"{100 * count / total:.1f}%" if total else "-"
            rows.append(
                {"stage": stage, "reason": reason, "count": count, "share": share,
                 "examples": examples.get(reason, [])}
            )  # fmt: skip
    return rows


def add_rows(stats: DataStats, workdir: str | Path, manifest: Manifest) -> None:
    """Original sizes, caption lengths, words and bigrams of the rows of `manifest`."""
    for table in read_shards(workdir, manifest, columns=_present_columns(workdir, manifest)):
        stats.widths.extend(_original(table, "width").to_pylist())
        stats.heights.extend(_original(table, "height").to_pylist())
        for caption in table.column("caption").to_pylist():
            words = caption_words(caption)
            stats.caption_words.append(len(words))
            stats.words.update(w for w in words if w not in STOPWORDS)
            stats.bigrams.update(
                f"{a} {b}"
                for a, b in zip(words, words[1:], strict=False)
                if a not in STOPWORDS and b not in STOPWORDS
            )
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


def metadata_scores(workdir: str | Path, manifest: Manifest) -> dict[str, array]:
    """Numeric fields of the shards' `metadata` JSON column (similarity, pwatermark, ...)."""
    paths = shard_paths(workdir, manifest)
    if not paths or "metadata" not in pq.read_schema(paths[0]).names:
        return {}
    values: dict[str, array] = defaultdict(lambda: array("d"))
    for table in read_shards(workdir, manifest, columns=["metadata"]):
        for text in table.column("metadata").drop_null().to_pylist():
            for name, value in json.loads(text).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    values[f"metadata: {name}"].append(float(value))
    return dict(sorted(values.items()))


def measured_scores(failures: pa.Table) -> dict[str, array]:
    """Values the filter measured on the rows it rejected, from details such as
    "ratio 5.00 > 2.0", "similarity=0.2 < min 0.28" or "k00 at Hamming distance 3": one series
    per reason and measured name."""
    values: dict[str, array] = defaultdict(lambda: array("d"))
    for reason, detail in _reasons_and_details(failures):
        for name, value in MEASURED.findall(detail or ""):
            values[f"rejected ({reason}): {name}"].append(float(value))
        twin = TWIN.fullmatch(detail or "") if reason in DUPLICATE_REASONS else None
        if twin:  # "k00 at Hamming distance 3"
            values[f"rejected ({reason}): {twin['measure']}"].append(float(twin["value"]))
    return dict(sorted(values.items()))


def _reasons_and_details(failures: pa.Table) -> Iterator[tuple[str, str | None]]:
    for batch in failures.select(["reason", "detail"]).to_batches(BATCH):
        yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True)


def twin_id(detail: str) -> str:
    """The kept sample a duplicate's failure detail names."""
    twin = TWIN.fullmatch(detail)
    return twin["id"] if twin else detail


def duplicate_clusters(failures: pa.Table, limit: int = CLUSTERS) -> list[Cluster]:
    """The largest groups of samples dropped as duplicates of the same kept sample."""
    groups: dict[str, Cluster] = {}
    duplicates = failures.filter(pc.is_in(failures.column("reason"), pa.array(DUPLICATE_REASONS)))
    for batch in duplicates.select(["id", "reason", "detail"]).to_batches(BATCH):
        for row in batch.to_pylist():
            if row["detail"]:
                twin = twin_id(row["detail"])
                cluster = groups.setdefault(twin, Cluster(twin, [], 0))
                cluster.size += 1
                if len(cluster.members) < CLUSTER_SIZE:  # memory: a count per kept sample
                    cluster.members.append((row["id"], row["reason"]))
    return sorted(groups.values(), key=lambda c: (-c.size, c.kept))[:limit]


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
