"""Caption stage: give every kept sample the caption it is trained on.

Run it with `sdflow run tiny-cpu --only caption`. A captioner chosen by `caption.backend`
proposes a caption per sample: `keep` uses the source caption (whitespace normalised); generative
backends (BLIP, clip-interrogator) join the `CAPTIONERS` registry later. A caption that is missing
or breaks the filter's caption rules is either filled with `caption.template` or rejected, per
`caption.on_missing`; then `caption.prefix` / `caption.suffix` are applied. Output shards are the
filter's shards with `caption` set to the training caption and `source_caption` holding the caption
as it came.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from sdflow.captions import (
    MISSING,
    caption_problem,
    caption_rules,
    describe_caption,
    normalize_caption,
    training_caption,
)
from sdflow.config import CaptionConfig, RunConfig
from sdflow.errors import UserError
from sdflow.fingerprint import code_version
from sdflow.orchestration import stage_task
from sdflow.stageio import (
    FAILURES,
    Manifest,
    StageBuild,
    build_stage,
    failures_table,
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

    def __init__(self, cfg: CaptionConfig):
        self.cfg = cfg

    def caption(
        self, images: list[Image.Image] | None, existing: list[str | None]
    ) -> list[str | None]:
        return list(existing)


CAPTIONERS: dict[str, Callable[[CaptionConfig], Captioner]] = {"keep": KeepCaptioner}


def make_captioner(cfg: CaptionConfig) -> Captioner:
    if cfg.backend not in CAPTIONERS:
        known = ", ".join(sorted(CAPTIONERS))
        raise UserError(f"Unknown caption.backend {cfg.backend!r}; the known backends are {known}.")
    return CAPTIONERS[cfg.backend](cfg)


def caption_key(config: RunConfig, upstream: dict[str, Manifest | None]) -> str:
    settings = {"caption": config.caption.model_dump(), "rules": caption_rules(config.filter)}
    return stage_key("caption", settings, [upstream["filter"]], code_version(__name__))


def caption_samples(
    config: RunConfig, upstream: dict[str, Manifest | None], workdir: str
) -> Manifest:
    """Build (or reuse) the caption stage output for the filter stage's shards."""
    key = caption_key(config, upstream)
    return build_stage(workdir, "caption", key, lambda build: _build(build, config, upstream))


caption_task = stage_task("caption", caption_key)(caption_samples)


def propose_captions(
    table: pa.Table, captioner: Captioner, config: RunConfig, progress: tqdm
) -> list[str | None]:
    """The captioner's proposal per row, called in batches of `caption.batch_size`."""
    existing = [
        None if caption_problem(text, config.filter) else normalize_caption(text)
        for text in table.column("caption").to_pylist()
    ]
    proposed: list[str | None] = []
    step = config.caption.batch_size
    for start in range(0, table.num_rows, step):
        batch = table.slice(start, step)
        images = decode_images(batch) if captioner.needs_images else None
        proposed.extend(captioner.caption(images, existing[start : start + step]))
        progress.update(batch.num_rows)
    return proposed


def decode_images(table: pa.Table) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(data)).convert("RGB") for data in table.column("image").to_pylist()
    ]


def caption_shard(
    table: pa.Table, captioner: Captioner, config: RunConfig, progress: tqdm
) -> tuple[pa.Table, list[dict[str, Any]], int]:
    """Kept rows with training captions, failure records, and how many got the template."""
    sources = table.column("caption").to_pylist()
    keep, captions, failures, templated = [], [], [], 0
    for row, text in enumerate(propose_captions(table, captioner, config, progress)):
        if text is None and config.caption.on_missing == "template":
            text, templated = config.caption.template, templated + 1
        keep.append(text is not None)
        if text is None:
            failures.append(_failure(table, row, sources[row], config))
        else:
            captions.append(training_caption(normalize_caption(text), config.caption))
    kept = table.filter(pa.array(keep, type=pa.bool_()))
    position = kept.schema.get_field_index("caption")
    kept = kept.set_column(position, "caption", pa.array(captions, type=pa.string()))
    source = pa.array([s for s, k in zip(sources, keep, strict=True) if k], type=pa.string())
    return kept.add_column(position + 1, "source_caption", source), failures, templated


def _failure(table: pa.Table, row: int, source: str | None, config: RunConfig) -> dict[str, Any]:
    return {
        "id": table.column("id")[row].as_py(),
        "source": table.column("source")[row].as_py() if "source" in table.column_names else None,
        "reason": caption_problem(source, config.filter) or MISSING,
        "detail": describe_caption(source),
    }


def _build(build: StageBuild, config: RunConfig, upstream: dict[str, Manifest | None]) -> Manifest:
    manifest = upstream["filter"]
    captioner = make_captioner(config.caption)
    totals: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    names, seconds, captioned = [], 0.0, 0
    with tqdm(total=manifest["counts"].get("kept"), desc="caption", unit="img") as progress:
        for index, path in enumerate(shard_paths(build.workdir, manifest)):
            name = shard_name(index)
            if build.has(name):  # finished before a crash: kept as it is
                stats = _read_stats(build, index)
                progress.update(stats["input"])
            else:
                started = time.monotonic()
                table = pq.read_table(path)
                stats = _caption_one(build, index, table, captioner, config, progress)
                seconds += time.monotonic() - started
                captioned += stats["input"]
            totals.update({k: stats[k] for k in ("input", "kept", "templated")})
            reasons.update(stats["failed_by_reason"])
            names.append(name)
    _require_survivors(totals, reasons)
    counts = {**totals, "failed": sum(reasons.values()), "failed_by_reason": dict(reasons)}
    # None when every shard was finished before a crash: nothing was timed in this run
    counts["images_per_second"] = round(captioned / seconds, 1) if seconds > 0 else None
    info = {"backend": config.caption.backend, "on_missing": config.caption.on_missing}
    return build.finish(counts=counts, shards=names, files={"failures": FAILURES}, info=info)


def _caption_one(
    build: StageBuild,
    index: int,
    table: pa.Table,
    captioner: Captioner,
    config: RunConfig,
    progress: tqdm,
) -> dict[str, Any]:
    """Caption one shard; its stats are written before the shard, whose presence means finished."""
    kept, failures, templated = caption_shard(table, captioner, config, progress)
    stats = {
        "input": table.num_rows,
        "kept": kept.num_rows,
        "templated": templated,
        "failed_by_reason": dict(Counter(f["reason"] for f in failures)),
    }
    (build.path / STATS).mkdir(exist_ok=True)
    write_json(build.path / STATS / shard_name(index, "json"), stats)
    build.write_shard(index, kept, failures_table(failures))
    return stats


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
