"""Caption stage: give every kept sample the caption it is trained on.

Run it with `sdflow run tiny-cpu --only caption`. Per row the source caption is cleaned
(`caption.boilerplate`) and is usable when it passes the filter's caption rules. `caption.policy`
picks the rows the backend (`caption.backend`, registered in `CAPTIONERS`) captions: `missing`
(rows without a usable caption), `all` (every row; the generated caption replaces the source one)
or `append` (source caption + generated one). Backends: `keep` (the source caption), `blip`
(BLIP / BLIP-2 through transformers, batched) and `clip-interrogator` (optional `caption` extra).
A row that still has no caption is filled with `caption.template` or rejected, per
`caption.on_missing`; then `caption.prefix` / `caption.suffix` are applied and the caption is cut
to `caption.max_tokens`. Output shards are the filter's shards with `caption` set to the training
caption and `source_caption` holding the caption as it came. Finished shards survive a crash; the
key holds the captioner's model identity, so another model re-captions (and nothing upstream).
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from sdflow.config import CaptionConfig, RunConfig
from sdflow.data.captioners import captioner_identity, require_backend
from sdflow.data.captions import (
    MISSING,
    NOT_GENERATED,
    SOURCE_BACKENDS,
    caption_finisher,
    caption_problem,
    caption_rules,
    clean_caption,
    combine_captions,
    describe_caption,
    needs_caption,
    tokenizer_identity,
    usable_caption,
)
from sdflow.errors import UserError
from sdflow.ops.orchestration import mapped_shards, stage_task
from sdflow.store.fingerprint import code_version
from sdflow.store.reuse import Outcome, row_keys, shared_memo, write_outcomes
from sdflow.store.shardmap import ShardJob, ShardMapper, ShardTimes, Span, in_order, span_since
from sdflow.store.stageio import (
    FAILURES,
    Manifest,
    StageBuild,
    build_stage,
    shard_name,
    shard_paths,
    stage_key,
    write_json,
)

STATS = "stats"  # per-shard counts, so a resumed build reports the same numbers


class Captioner(Protocol):
    """Proposes captions for a batch; None where it has none (then `caption.on_missing` decides)."""

    needs_images: bool  # False: `caption` gets images=None and nothing is decoded

    def caption(
        self, images: list[Image.Image] | None, existing: list[str | None]
    ) -> list[str | None]: ...


class KeepCaptioner:
    """The source caption as it is; `existing` is None where it is missing or breaks the rules."""

    needs_images = False

    def __init__(self, cfg: CaptionConfig, cache_dir: Path | None = None):
        self.cfg = cfg

    def caption(
        self, images: list[Image.Image] | None, existing: list[str | None]
    ) -> list[str | None]:
        return list(existing)


def blip_captioner(cfg: CaptionConfig, cache_dir: Path | None = None) -> Captioner:
    from sdflow.data.captioners.blip import (
        BlipCaptioner,  # torch, transformers: only when it captions
    )

    return BlipCaptioner(cfg, cache_dir)


def interrogator_captioner(cfg: CaptionConfig, cache_dir: Path) -> Captioner:
    from sdflow.data.captioners.interrogator import InterrogatorCaptioner

    return InterrogatorCaptioner(cfg, cache_dir)


# A factory gets the caption section and a directory for reusable files (term embeddings).
CAPTIONERS: dict[str, Callable[[CaptionConfig, Path], Captioner]] = {
    "keep": KeepCaptioner,
    "blip": blip_captioner,
    "clip-interrogator": interrogator_captioner,
}


def make_captioner(cfg: CaptionConfig, cache_dir: Path) -> Captioner:
    if cfg.backend not in CAPTIONERS:
        known = ", ".join(sorted(CAPTIONERS))
        raise UserError(f"Unknown caption.backend {cfg.backend!r}; the known backends are {known}.")
    return CAPTIONERS[cfg.backend](cfg, cache_dir)


class LazyCaptioner:
    """The backend, built on first use: a resumed build, or shards whose captions are all usable
    (policy `missing`), load no model."""

    def __init__(self, cfg: CaptionConfig, cache_dir: Path):
        self.cfg, self.cache_dir = cfg, cache_dir
        self.built: Captioner | None = None
        self.lock = threading.RLock()  # shard jobs on threads share one model, a batch at a time

    def get(self) -> Captioner:
        with self.lock:
            if self.built is None:
                self.built = make_captioner(self.cfg, self.cache_dir)
            return self.built

    @property
    def needs_images(self) -> bool:
        return self.get().needs_images

    def caption(
        self, images: list[Image.Image] | None, existing: list[str | None]
    ) -> list[str | None]:
        with self.lock:
            return self.get().caption(images, existing)


def caption_settings(config: RunConfig) -> dict[str, Any]:
    """Everything besides the input rows that decides a caption."""
    return {
        "caption": config.caption.model_dump(),
        "rules": caption_rules(config.filter),
        "models": captioner_identity(config.caption),  # hub name@revision or weights hash
        "tokenizer": tokenizer_identity(config),  # what caption.max_tokens counts with
    }


def caption_key(config: RunConfig, upstream: dict[str, Manifest | None]) -> str:
    return stage_key(
        "caption", caption_settings(config), [upstream["filter"]], code_version(__name__)
    )


def caption_samples(
    config: RunConfig,
    upstream: dict[str, Manifest | None],
    workdir: str,
    mapper: ShardMapper = in_order,
) -> Manifest:
    """Build (or reuse) the caption stage output for the filter stage's shards.

    `mapper` runs the per-shard jobs (`caption_one_shard`); by default one after another, here.
    """
    require_backend(config.caption)  # a missing optional extra fails before any work
    key = caption_key(config, upstream)
    return build_stage(
        workdir, "caption", key, lambda build: _build(build, config, upstream, mapper)
    )


caption_task = stage_task("caption", caption_key)(mapped_shards(caption_samples))


def propose_captions(
    table: pa.Table, captioner: Captioner, config: RunConfig, progress: tqdm
) -> tuple[list[str | None], list[str | None]]:
    """Usable source captions, and the backend's cleaned captions for the rows `caption.policy`
    asks it about (None elsewhere), asked in batches of `caption.batch_size`."""
    cfg = config.caption
    sources = table.column("caption").to_pylist()
    existing = [usable_caption(text, config.filter, cfg) for text in sources]
    asked = [row for row, text in enumerate(existing) if needs_caption(text, cfg)]
    proposed: list[str | None] = [None] * table.num_rows
    progress.update(table.num_rows - len(asked))
    for start in range(0, len(asked), cfg.batch_size):
        rows = asked[start : start + cfg.batch_size]
        images = decode_images(table.take(rows)) if captioner.needs_images else None
        texts = captioner.caption(images, [existing[row] for row in rows])
        for row, text in zip(rows, texts, strict=True):
            proposed[row] = clean_caption(text, cfg) or None
        progress.update(len(rows))
    return existing, proposed


def decode_images(table: pa.Table) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(data)).convert("RGB") for data in table.column("image").to_pylist()
    ]


def caption_outcomes(
    table: pa.Table,
    captioner: Captioner,
    config: RunConfig,
    progress: tqdm,
    finish: Callable[[str], str],
) -> list[Outcome]:
    """Each row's outcome: kept with its training caption (`finish`: prefix, suffix, token limit)
    and the caption as it came in `source_caption`, or a failure record; `extra` says whether the
    backend generated it and whether the template filled it."""
    cfg = config.caption
    outcomes = []
    existing, proposed = propose_captions(table, captioner, config, progress)
    for row, (values, source, generated) in enumerate(
        zip(table.to_pylist(), existing, proposed, strict=True)
    ):
        text = combine_captions(source, generated, cfg)
        templated = text is None and cfg.on_missing == "template"
        text = cfg.template if templated else text
        extra = {"generated": generated is not None, "templated": templated}
        if text is None:
            outcomes.append(Outcome(False, _failure(table, row, values["caption"], config), extra))
        else:
            kept = {**values, "caption": finish(text), "source_caption": values["caption"]}
            outcomes.append(Outcome(True, kept, extra))
    return outcomes


def output_schema(schema: pa.Schema) -> pa.Schema:
    """The input shard schema with `source_caption` after `caption`."""
    position = schema.get_field_index("caption")
    return schema.insert(position + 1, pa.field("source_caption", pa.string()))


def _failure(table: pa.Table, row: int, source: str | None, config: RunConfig) -> dict[str, Any]:
    if config.caption.backend in SOURCE_BACKENDS:
        reason = caption_problem(clean_caption(source, config.caption), config.filter) or MISSING
    else:
        reason = NOT_GENERATED  # asked, because the source caption was unusable, and got nothing
    return {
        "id": table.column("id")[row].as_py(),
        "source": table.column("source")[row].as_py() if "source" in table.column_names else None,
        "reason": reason,
        "detail": describe_caption(source),
    }


def _build(
    build: StageBuild,
    config: RunConfig,
    upstream: dict[str, Manifest | None],
    mapper: ShardMapper,
) -> Manifest:
    manifest = upstream["filter"]
    caption_finisher(config)  # prefix and suffix over caption.max_tokens: fail before any work
    paths = shard_paths(build.workdir, manifest)
    done = {i for i in range(len(paths)) if build.has(shard_name(i))}  # kept from before a crash
    jobs = [ShardJob(build, config, i, str(p)) for i, p in enumerate(paths) if i not in done]
    totals: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    names, seconds, captioned, computed, times = [], 0.0, 0, 0, ShardTimes()
    try:
        with (
            tqdm(total=manifest["counts"].get("kept"), desc="caption", unit="img") as progress,
            closing(mapper(caption_one_shard, jobs)) as results,
        ):
            for index in range(len(paths)):
                if index in done:
                    stats = _read_stats(build, index)
                else:
                    stats, span = next(results)
                    seconds, captioned = seconds + times.add(span), captioned + stats["input"]
                    computed += stats["computed"]
                progress.update(stats["input"])
                totals.update({k: stats[k] for k in ("input", "kept", "generated", "templated")})
                reasons.update(stats["failed_by_reason"])
                names.append(shard_name(index))
    finally:
        release_captioners()
    _require_survivors(totals, reasons)
    counts = {**totals, "failed": sum(reasons.values()), "failed_by_reason": dict(reasons)}
    cfg = config.caption
    info = {"backend": cfg.backend, "policy": cfg.policy, "on_missing": cfg.on_missing}
    # None when every shard was finished before a crash: nothing was timed in this run
    info["images_per_second"] = round(captioned / seconds, 1) if seconds > 0 else None
    info["rows_computed"] = computed  # this build; the other rows came from earlier builds
    info.update(times.info())
    if cfg.backend not in SOURCE_BACKENDS:
        info["model"] = cfg.model
    return build.finish(counts=counts, shards=names, files={"failures": FAILURES}, info=info)


def caption_one_shard(job: ShardJob) -> tuple[dict[str, Any], Span]:
    """Caption shard `job.index` (input `job.source`) into the partial directory: (stats, span).

    Runs wherever the mapper puts it (a thread, a Dask worker); the stage reports progress per shard.
    """
    started = time.time()
    captioner, finish = shared_captioner(job.config, Path(job.build.workdir) / "cache")
    with tqdm(disable=True) as quiet:
        table = pq.read_table(job.source)
        stats = _caption_one(job.build, job.index, table, captioner, finish, job.config, quiet)
    return stats, span_since(started)


_SHARED: dict[str, tuple[LazyCaptioner, Callable[[str], str]]] = {}
_SHARED_LOCK = threading.Lock()


def shared_captioner(
    config: RunConfig, cache_dir: Path
) -> tuple[LazyCaptioner, Callable[[str], str]]:
    """This process's captioner and caption finisher for `config`, built once for all its shards.

    One at a time: another config replaces it. The stage releases it when done; a Dask worker keeps
    its own until its next caption config.
    """
    key = config.model_dump_json(include={"caption", "model"}) + str(cache_dir)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED.clear()
            _SHARED[key] = (LazyCaptioner(config.caption, cache_dir), caption_finisher(config))
        return _SHARED[key]


def release_captioners() -> None:
    """Drop this process's captioner (and the model it holds)."""
    with _SHARED_LOCK:
        _SHARED.clear()


def _caption_one(
    build: StageBuild,
    index: int,
    table: pa.Table,
    captioner: Captioner,
    finish: Callable[[str], str],
    config: RunConfig,
    progress: tqdm,
) -> dict[str, Any]:
    """Caption one shard, reusing the rows an earlier build captioned (`sdflow.store.reuse`); its stats
    are written before the shard, whose presence means finished."""
    keys = row_keys(table.to_pylist(), rows_salt(config))
    memo = shared_memo(build.workdir, "caption", build.key)
    outcomes, computed = memo.outcomes(
        keys, lambda rows: caption_outcomes(table.take(rows), captioner, config, progress, finish)
    )
    stats = {
        "input": table.num_rows,
        "kept": sum(o.kept for o in outcomes),
        "generated": sum(o.extra["generated"] for o in outcomes),
        "templated": sum(o.extra["templated"] for o in outcomes),
        "failed_by_reason": dict(Counter(o.row["reason"] for o in outcomes if not o.kept)),
    }
    (build.path / STATS).mkdir(exist_ok=True)
    write_json(build.path / STATS / shard_name(index, "json"), stats)
    schema = output_schema(table.schema)
    write_outcomes(
        build, index, keys, outcomes, schema, {"generated": pa.bool_(), "templated": pa.bool_()}
    )
    return {**stats, "computed": computed}


def rows_salt(config: RunConfig) -> str:
    """What a caption row's key holds besides the row: the stage settings and code version."""
    return stage_key("caption", caption_settings(config), [], code_version(__name__))


def _read_stats(build: StageBuild, index: int) -> dict[str, Any]:
    return json.loads((build.path / STATS / shard_name(index, "json")).read_text())


def _require_survivors(totals: Counter[str], reasons: Counter[str]) -> None:
    if totals["kept"] > 0:
        return
    why = ", ".join(f"{reason}: {n}" for reason, n in reasons.most_common()) or "no input samples"
    raise UserError(
        f"The caption stage kept none of the {totals['input']} filtered samples ({why}). "
        "Set caption.on_missing: template to caption samples that have no usable caption, "
        "or relax the filter's caption rules (filter.min_caption_words, min_caption_chars)."
    )
