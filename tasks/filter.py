"""Filter stage: keep the downloaded samples that are good enough to train on.

Run it with `sdflow run tiny-cpu --only filter`. Each sample passes, in order: a full decode of the
stored bytes, the minimum original size, the maximum original aspect ratio and the caption rules
(skipped when the caption stage will supply captions itself), then the registered curation filters
(`sdflow.data.filters`: metadata thresholds, CLIP score and aesthetic head on the one CLIP embedding
pass, image classifiers). The survivors then go through the whole-dataset duplicate pass
(`sdflow.data.filters.dedup`: content hash, perceptual hash, CLIP embedding), first occurrence in shard
order wins. Every rejected sample is recorded with its reason and the measured value. Output shards
have the download schema and hold the kept rows, copied without re-encoding, one output shard per
input shard; finished shards survive a crash.

The per-sample checks (decoding is the expensive part) run per shard on the task runner
(`check_one_shard`, see `sdflow.store.shardmap`); deduplication then takes their verdicts in shard order
here, and writes each shard.
"""

from __future__ import annotations

import io
import time
from collections import Counter
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from sdflow.config import FilterConfig, RunConfig
from sdflow.data.captions import RULE_FIELDS, caption_problem, captions_supplied, describe_caption
from sdflow.data.filters import (
    BatchCheck,
    Check,
    Rejection,
    configured_checks,
    first_rejections,
    per_row,
)
from sdflow.data.filters.classifier import classifier_identity
from sdflow.data.filters.clip import (
    attach_embeddings,
    clip_embeddings,
    clip_identity,
    clip_needed,
    embeddings_shard,
)
from sdflow.data.filters.dedup import Deduplicator
from sdflow.data.filters.phash import phash_hex
from sdflow.data.filters.semantic import semantic_index
from sdflow.errors import UserError
from sdflow.ops.orchestration import mapped_shards, stage_task
from sdflow.store.fingerprint import code_version
from sdflow.store.reuse import ROWS, record_rows, row_keys, shared_memo
from sdflow.store.shardmap import ShardJob, ShardMapper, ShardTimes, Span, in_order, span_since
from sdflow.store.stageio import (
    FAILURES,
    Manifest,
    StageBuild,
    build_stage,
    failures_table,
    shard_name,
    shard_paths,
    stage_key,
)

Row = dict[str, Any]
Checked = tuple[list[bytes], list[Rejection | None], list[str | None], Span]
"""One shard's per-row results: keys, verdicts (None: passes) and pHashes (None: not computed),
and the span of the job that checked them (`sdflow.store.shardmap`)."""
# settings of the whole-dataset pass, not of a row: a new value re-checks no row
DATASET_PASS = ("dedup", "near_dup_distance", "semantic_dedup")


def filter_settings(config: RunConfig) -> dict[str, Any]:
    """The settings that decide the output; the caption rules only when the filter applies them;
    each classifier's weights hash."""
    settings = config.filter.model_dump()
    settings["caption_rules"] = not captions_supplied(config.caption)
    if not settings["caption_rules"]:
        for name in RULE_FIELDS:
            settings.pop(name)
    for spec, dumped in zip(config.filter.classifiers, settings["classifiers"], strict=True):
        dumped["weights"] = classifier_identity(spec)
    settings.update(clip_identity(config.filter))
    return settings


def filter_key(config: RunConfig, upstream: dict[str, Manifest | None]) -> str:
    return stage_key(
        "filter", filter_settings(config), [upstream["download"]], code_version(__name__)
    )


def filter_samples(
    config: RunConfig,
    upstream: dict[str, Manifest | None],
    workdir: str,
    mapper: ShardMapper = in_order,
) -> Manifest:
    """Build (or reuse) the filter stage output for the download stage's shards.

    `mapper` runs the per-shard checks (`check_one_shard`); by default one after another, here.
    """
    key = filter_key(config, upstream)
    return build_stage(
        workdir, "filter", key, lambda build: _build(build, config, upstream, mapper)
    )


filter_task = stage_task("filter", filter_key)(mapped_shards(filter_samples))


def sample_checks(cfg: FilterConfig, caption_rules: bool) -> list[BatchCheck]:
    """The per-sample checks in order: the built-in ones, cheapest first, then the registered
    curation filters (`sdflow.data.filters`)."""
    checks: list[Check] = [
        check_decodes,
        partial(check_min_size, min_size=cfg.min_size),
        partial(check_aspect_ratio, max_ratio=cfg.max_aspect_ratio),
    ]
    if caption_rules:
        checks.append(partial(check_caption, cfg=cfg))
    return [*map(per_row, checks), *configured_checks(cfg)]


def check_decodes(row: Row) -> Rejection | None:
    """The stored bytes must decode completely (a truncated file fails in `load`, not `open`)."""
    data = row.get("image")
    if not data:
        return Rejection("decode_error", "no image bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for bad bytes
        return Rejection("decode_error", f"{type(exc).__name__}: {exc}"[:300])
    return None


def original_size(row: Row) -> tuple[int, int]:
    """Size before the download resize; the stored size when the source did not record it."""
    return (row.get("orig_width") or row["width"], row.get("orig_height") or row["height"])


def check_min_size(row: Row, min_size: int) -> Rejection | None:
    width, height = original_size(row)
    if min(width, height) < min_size:
        return Rejection("too_small", f"{width}x{height} original, shorter side < {min_size}")
    return None


def check_aspect_ratio(row: Row, max_ratio: float) -> Rejection | None:
    width, height = original_size(row)
    ratio = max(width, height) / max(min(width, height), 1)
    if ratio > max_ratio:
        return Rejection(
            "aspect_ratio", f"{width}x{height} original, ratio {ratio:.2f} > {max_ratio}"
        )
    return None


def check_caption(row: Row, cfg: FilterConfig) -> Rejection | None:
    reason = caption_problem(row.get("caption"), cfg)
    return Rejection(reason, describe_caption(row.get("caption"))) if reason else None


def check_one_shard(job: ShardJob) -> Checked:
    """The per-sample checks of one input shard: each row's key, verdict (None where it passes)
    and, with near-duplicate removal on, the pHash of each row that passes.

    Rows an earlier build of the stage checked with the same per-row settings and code keep that
    build's verdict and pHash (`sdflow.store.reuse`); only new or changed rows are decoded and checked.
    """
    started = time.time()
    table = pq.read_table(job.source)
    keys = row_keys(table.to_pylist(), rows_salt(job.config))
    known = shared_memo(job.build.workdir, "filter", job.build.key).facts(keys)
    todo = [row for row in range(len(keys)) if row not in known]
    checks = sample_checks(job.config.filter, not captions_supplied(job.config.caption))
    hashing = job.config.filter.near_dup_distance is not None
    rows = table.take(pa.array(todo, pa.int64())).to_pylist()
    if clip_needed(job.config.filter):
        shard = embeddings_shard(job.config, job.source, job.index, job.build.workdir)
        rows = attach_embeddings(rows, todo, shard)
    fresh = dict(zip(todo, check_rows(rows, checks, hashing), strict=True))
    results = [fresh[row] if row in fresh else _verdict(known[row]) for row in range(len(keys))]
    return keys, [r[0] for r in results], [r[1] for r in results], span_since(started)


def rows_salt(config: RunConfig) -> str:
    """What a filter row's key holds besides the row: the per-row settings (not those of the
    dataset pass, but whether rows are hashed for it) and the code version."""
    settings = filter_settings(config)
    settings["phash"] = settings["near_dup_distance"] is not None
    for name in DATASET_PASS:
        settings.pop(name)
    return stage_key("filter", settings, [], code_version(__name__))


def _verdict(facts: dict[str, Any]) -> tuple[Rejection | None, str | None]:
    rejection = Rejection(facts["check"], facts["check_detail"]) if facts.get("check") else None
    return rejection, facts.get("phash")


def check_rows(
    rows: list[Row], checks: list[BatchCheck], hashing: bool = False
) -> list[tuple[Rejection | None, str | None]]:
    """Each row's first rejection, and the pHash of those that pass when `hashing`."""
    verdicts = first_rejections(rows, checks)
    return [
        (v, phash_hex(row["image"]) if hashing and v is None else None)
        for row, v in zip(rows, verdicts, strict=True)
    ]


def filter_shard(
    table: pa.Table,
    verdicts: list[Rejection | None],
    dedup: Deduplicator,
    phashes: list[str | None] | None = None,
    embeds: list[list[float] | None] | None = None,
) -> tuple[pa.Table, list[dict[str, str]], list[bool]]:
    """Kept rows (copied, not re-encoded), one failure record per rejected row, and which input
    rows were kept; `phashes` and `embeds` (CLIP image embeddings) serve the duplicate pass."""
    kept: list[int] = []
    failures: list[dict[str, str]] = []
    fields = [name for name in ("id", "content_hash", "source") if name in table.column_names]
    phashes = phashes or [None] * table.num_rows
    embeds = embeds or [None] * table.num_rows
    for index, row in enumerate(table.select(fields).to_pylist()):
        # last: the kept twin is a kept sample
        rejection = verdicts[index] or dedup.check(row, phashes[index], embeds[index])
        if rejection is None:
            kept.append(index)
            dedup.add(row.get("content_hash"), row["id"], phashes[index], embeds[index])
        else:
            failures.append(_failure(row, rejection))
    mask = [False] * table.num_rows
    for index in kept:
        mask[index] = True
    return table.take(pa.array(kept, type=pa.int64())), failures, mask


def _failure(row: Row, rejection: Rejection) -> dict[str, str]:
    return {
        "id": row["id"],
        "source": row.get("source"),
        "reason": rejection.reason,
        "detail": rejection.detail,
    }


def _build(
    build: StageBuild,
    config: RunConfig,
    upstream: dict[str, Manifest | None],
    mapper: ShardMapper,
) -> Manifest:
    counts = {"input": 0, "kept": 0}
    reasons: Counter[str] = Counter()
    names = []
    paths = shard_paths(build.workdir, upstream["download"])
    clip = None
    if clip_needed(config.filter):  # the one CLIP pass, before the shard jobs read it
        clip = clip_embeddings(config, upstream["download"], build.workdir)
    semantic = semantic_index(config.filter, clip, build.workdir)
    dedup = Deduplicator(config.filter.dedup, config.filter.near_dup_distance, semantic)
    embeds = partial(_image_embeds, build.workdir, clip) if semantic else lambda index: None
    done = {i for i in range(len(paths)) if build.has(shard_name(i))}  # kept from before a crash
    jobs = [ShardJob(build, config, i, str(p)) for i, p in enumerate(paths) if i not in done]
    times = ShardTimes()
    with (
        tqdm(total=len(paths), desc="filter", unit="shard") as progress,
        closing(mapper(check_one_shard, jobs)) as verdicts,
    ):
        for index, path in enumerate(paths):
            name = shard_name(index)
            if index in done:  # keep it, but remember its hashes
                kept, failed = _read_finished(build, name, dedup, embeds(index))
            else:
                checked = next(verdicts)
                times.add(checked[3])
                kept, failed = _write_filtered(build, index, path, checked, dedup, embeds(index))
            counts["input"] += kept + len(failed)
            counts["kept"] += kept
            reasons.update(failed)
            names.append(name)
            progress.update(1)
    _require_survivors(counts, reasons, config.filter)
    return build.finish(
        counts={**counts, "failed": sum(reasons.values()), "failed_by_reason": dict(reasons)},
        shards=names,
        files={"failures": FAILURES},
        info={
            "caption_rules": not captions_supplied(config.caption),
            "dedup": config.filter.dedup,
            "near_dup_distance": config.filter.near_dup_distance,
            "semantic_clusters": len(semantic.centroids) if semantic else None,
            "clip_embeddings": clip["path"] if clip else None,
            **times.info(),
        },
    )


def _write_filtered(
    build: StageBuild,
    index: int,
    path: Path,
    checked: Checked,
    dedup: Deduplicator,
    embeds: list[list[float] | None] | None = None,
) -> tuple[int, list[str]]:
    """Deduplicate shard `index` given its rows' keys, verdicts and pHashes (and CLIP image
    embeddings), write it (the rows' record with their per-row results first, see
    `sdflow.store.reuse`): (kept, failure reasons)."""
    keys, verdicts, phashes, _ = checked
    table = pq.read_table(path)
    kept_table, failures, kept = filter_shard(table, verdicts, dedup, phashes, embeds)
    facts = {
        "check": [v.reason if v else None for v in verdicts],
        "check_detail": [v.detail if v else None for v in verdicts],
        "phash": phashes,
    }
    record_rows(build, index, keys, kept, facts, dict.fromkeys(facts, pa.string()))
    build.write_shard(index, kept_table, failures_table(failures))
    return kept_table.num_rows, [f["reason"] for f in failures]


def _read_finished(
    build: StageBuild, name: str, dedup: Deduplicator, embeds: list | None = None
) -> tuple[int, list[str]]:
    """Counts of a shard finished before a crash, and its kept rows' hashes (content and
    perceptual, from the shard's row record) and embeddings fed back into `dedup`."""
    kept = pq.read_table(build.path / name, columns=["id", "content_hash"])
    record = pq.read_table(build.path / ROWS / name, columns=["file", "phash"]).to_pylist()
    rows = [i for i, r in enumerate(record) if r["file"] == name]  # kept input rows, in order
    for position, sample_id, content_hash in zip(
        rows, kept.column("id").to_pylist(), kept.column("content_hash").to_pylist(), strict=True
    ):
        embed = embeds[position] if embeds else None
        dedup.add(content_hash, sample_id, record[position]["phash"], embed)
    failed = pq.read_table(build.path / FAILURES / name, columns=["reason"])
    return kept.num_rows, failed.column("reason").to_pylist()


def _image_embeds(workdir: Path, clip: Manifest, index: int) -> list[list[float] | None]:
    """Each row's CLIP image embedding in download shard `index` (None: undecodable)."""
    table = pq.read_table(shard_paths(workdir, clip)[index], columns=["image_embed"])
    return table.column(0).to_pylist()


def _require_survivors(counts: dict[str, int], reasons: Counter[str], cfg: FilterConfig) -> None:
    if counts["kept"] > 0:
        return
    why = ", ".join(f"{reason}: {n}" for reason, n in reasons.most_common()) or "no input samples"
    raise UserError(
        f"The filter stage kept none of the {counts['input']} downloaded samples ({why}). "
        f"Loosen the filter settings (now min_size={cfg.min_size}, "
        f"max_aspect_ratio={cfg.max_aspect_ratio}, min_caption_words={cfg.min_caption_words}), "
        "set caption.on_missing: template for samples without captions, or check the source."
    )
