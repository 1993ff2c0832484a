"""Download stage: source rows -> shards of resized, re-encoded images with their captions.

    sdflow run tiny-cpu --only download

Rows come from the configured source (`urls`, `hf`, `folder` or `webdataset`, see `sdflow.data.sources`)
in a stable order; shard i holds rows [i * shard_size, (i + 1) * shard_size), so the output is
deterministic and a rerun after a crash redoes only unfinished shards. The stage reads the source
once, in order, and stages each unfinished shard's rows in the partial directory (`inputs/`, removed
when done); a shard job (`download_shard`, mapped by the task runner, see `sdflow.store.shardmap`) reads
them back, fetches its URLs concurrently on an asyncio event loop (aiohttp, `download.concurrency`
connections per shard in flight), decodes, resizes and encodes in worker threads beside it (Pillow
releases the GIL; `sdflow.store.handoff`, one loop wake-up per burst of results), and writes its shard.
Every row ends up kept in a shard or in the failures table with its reason.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, closing
from hashlib import sha256
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sdflow.config import RunConfig
from sdflow.data import imaging, masks, netguard, sources
from sdflow.data.imaging import ImageSpec, Rejected, process_image
from sdflow.data.masks import process_masked
from sdflow.data.sources import (
    SAMPLE_SCHEMA,
    SourceRow,
    fetcher,
    folder,
    hf,
    row_id,
    urls,
    webdataset,
)
from sdflow.errors import UserError
from sdflow.ops.artifacts import progress_bar
from sdflow.ops.orchestration import mapped_shards, stage_task
from sdflow.store import stageio
from sdflow.store.fingerprint import code_version
from sdflow.store.handoff import ThreadHandoff
from sdflow.store.reuse import Outcome, row_keys, shared_memo, write_outcomes
from sdflow.store.shardmap import ShardJob, ShardMapper, ShardTimes, in_order, span_since
from sdflow.store.stageio import FAILURES, Manifest, StageBuild, build_stage, shard_name

STAGE = "download"
# Knobs that change speed, not output: changing them must not invalidate a finished download.
SPEED_ONLY = {"concurrency", "decode_workers", "per_host_connections"}
INPUTS = "inputs"  # each unfinished shard's source rows, staged for its job
INPUT_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("id", pa.string()),
        ("caption", pa.string()),
        ("source", pa.string()),
        ("url", pa.string()),
        ("data", pa.binary()),
        ("path", pa.string()),
        ("root", pa.string()),
        ("offset", pa.int64()),
        ("length", pa.int64()),
        ("metadata", pa.string()),
        ("duplicate", pa.bool_()),
        ("mask", pa.string()),
    ]
)
HINTS = {
    "refused_address": "URLs resolving to private, loopback or link-local addresses are refused; "
    "set download.allow_private_network: true only for a list you trust",
    "timeout": "raise download.timeout_s or download.retries",
    "too_large": "raise download.max_bytes",
    "decompression_bomb": "raise download.max_pixels (at most 89,478,485)",
    "unsupported_format": "only JPEG, PNG, WebP, GIF, BMP and TIFF images are decoded",
    "outside_source": "image paths must stay inside the source directory (no symlinks out)",
    "dns_error": "check that this machine can resolve and reach the hosts",
    "connection_error": "check that this machine can reach the hosts",
}
_SOURCE_MODULES = (
    fetcher,
    folder,
    hf,
    urls,
    webdataset,
    imaging,
    masks,
    netguard,
)  # their code is part of code_version
# Failures a later build fetches again instead of reusing: they may pass tomorrow.
TRANSIENT = {"dns_error", "fetch_error", "read_error", "timeout", "connection_error", "empty_body"}
RETRIED_HTTP = {403, 408, 425, 429}


def download_key(config: RunConfig, upstream: dict[str, Manifest | None]) -> str:
    settings = {
        "source": config.source.model_dump(),
        "download": config.download.model_dump(exclude=SPEED_ONLY),
        "content": sources.fingerprint(config.source),
    }
    if config.train.masked_loss:  # the shards carry each image's mask
        settings["masked_loss"] = True
    return stageio.stage_key(STAGE, settings, [], code_version(__name__))


def download(
    config: RunConfig,
    upstream: dict[str, Manifest | None],
    workdir: str,
    mapper: ShardMapper = in_order,
) -> Manifest:
    """Build (or reuse) the download stage output for `config.source`.

    `mapper` runs the per-shard jobs (`download_shard`); by default one after another, here.
    """
    key = download_key(config, upstream)
    return build_stage(workdir, STAGE, key, lambda build: _build(build, config, mapper))


download_task = stage_task(STAGE, download_key)(mapped_shards(download))


def _build(build: StageBuild, config: RunConfig, mapper: ShardMapper) -> Manifest:
    rows = sources.open_rows(config.source)
    started = time.monotonic()
    names: list[str] = []  # every shard, finished or not, in order: filled as jobs are staged
    kept = fetched = 0  # by this run (not by an earlier, interrupted one)
    times = ShardTimes()
    with progress_bar(
        STAGE, total=rows.total, unit="img", desc=STAGE, mininterval=1.0, disable=None
    ) as bar:
        jobs = stage_inputs(build, config, rows.rows, names, bar.update)
        with closing(mapper(download_shard, jobs)) as results:
            for result in results:
                kept += result["kept"]
                fetched += result["fetched"]
                times.add(result["span"])
                bar.update(result["rows"])
    if not names:
        raise UserError(f"Source {config.source.path} ({config.source.kind}) has no rows.")
    shutil.rmtree(build.path / INPUTS, ignore_errors=True)
    seconds = time.monotonic() - started
    counts = count_outputs(build.path, names)
    if counts["kept"] == 0:
        raise UserError(describe_total_failure(config, counts))
    info = {
        "source_kind": config.source.kind,
        "source_path": config.source.path,
        "resolution": config.download.resolution,
        "resize_mode": config.download.resize_mode,
        "image_format": config.download.image_format,
        "decode_workers": config.download.decode_workers or available_cpus(),
        "seconds_this_run": round(seconds, 3),
        "images_per_second": round(kept / seconds, 2) if kept else 0.0,
        "rows_fetched": fetched,  # this build; the other rows came from earlier builds
        **times.info(),
    }
    return build.finish(counts=counts, shards=names, files={"failures": FAILURES}, info=info)


def stage_inputs(
    build: StageBuild,
    config: RunConfig,
    rows: Iterator[SourceRow],
    names: list[str],
    progress: Callable[[int], Any],
) -> Iterator[ShardJob]:
    """A job per unfinished shard, its rows staged in `inputs/` first; appends every shard's name.

    Lazy: the mapper takes the next job when a worker is free, so staging keeps pace with the
    workers and holds one shard's rows at a time.
    """
    seen: set[str] = set()
    for index, chunk in enumerate(sources.batched(rows, config.download.shard_size)):
        duplicates = duplicate_ids(chunk, seen, unique_ids_from_source(config))
        names.append(shard_name(index))
        if build.has(names[-1]):  # finished before a crash: keep it
            progress(len(chunk))
            continue
        table = pa.Table.from_pylist(
            [{**_row_fields(row), "duplicate": row.index in duplicates} for row in chunk],
            schema=INPUT_SCHEMA,
        )
        path = build.write_table(f"{INPUTS}/{shard_name(index)}", table)
        yield ShardJob(build, config, index, str(path))


def unique_ids_from_source(config: RunConfig) -> bool:
    """Whether ids come from the data (an id column, WebDataset keys), so they may repeat."""
    return config.source.id_column is not None or config.source.kind == "webdataset"


def duplicate_ids(chunk: list[SourceRow], seen: set[str], check: bool) -> set[int]:
    """Rows whose id an earlier row already has (only possible when ids come from the data)."""
    if not check:
        return set()
    duplicates = set()
    for row in chunk:
        if row.id in seen:
            duplicates.add(row.index)
        elif row.id:
            seen.add(row.id)
    return duplicates


def _row_fields(row: SourceRow) -> dict[str, Any]:
    return {name: getattr(row, name) for name in SourceRow.__slots__}


def download_shard(job: ShardJob) -> dict[str, Any]:
    """Download and process the staged rows of shard `job.index` into the partial directory.

    Rows an earlier build of the stage already fetched (same id, URL or file bytes, caption and
    download settings; `sdflow.store.reuse`) are copied from its output: a grown URL list or folder
    fetches only its new or changed rows. Failures that may pass (timeouts, 5xx, 429) are tried again.
    Returns its row counts and its `span` (`sdflow.store.shardmap`).
    """
    started = time.time()
    staged = pq.read_table(job.source).to_pylist()
    duplicates = {row["index"] for row in staged if row.pop("duplicate")}
    rows = [SourceRow(**row) for row in staged]
    limit = job.config.download.max_bytes
    fields = [_key_fields(r, r.index in duplicates, limit) for r in rows]
    keys = row_keys(fields, rows_salt(job.config))
    workers = job.config.download.decode_workers or available_cpus()
    with ThreadHandoff(workers, "sdflow-decode") as pool:
        run = ShardRun(job.build, job.config, pool, workers)
        memo = shared_memo(job.build.workdir, STAGE, job.build.key)
        outcomes, fetched = memo.outcomes(
            keys, lambda todo: run_async(lambda: run.some([rows[i] for i in todo], duplicates))
        )
    kept = write_outcomes(job.build, job.index, keys, outcomes, sample_schema(job.config))
    counts = {"rows": len(rows), "kept": kept.num_rows, "fetched": fetched}
    return {**counts, "span": span_since(started)}


def rows_salt(config: RunConfig) -> str:
    """What a download row's key holds besides the row: the settings that shape it, the code."""
    settings = config.download.model_dump(exclude=SPEED_ONLY)
    if config.train.masked_loss:
        settings["masked_loss"] = True
    return stageio.stage_key(STAGE, settings, [], code_version(__name__))


def sample_schema(config: RunConfig) -> pa.Schema:
    """The shards' schema: SAMPLE_SCHEMA, with `train.masked_loss` the masks' `mask` column."""
    if not config.train.masked_loss:
        return SAMPLE_SCHEMA
    return SAMPLE_SCHEMA.append(pa.field("mask", pa.binary()))


def _key_fields(row: SourceRow, duplicate: bool, max_bytes: int) -> dict[str, Any] | None:
    """What decides a row's result: its URL, or the bytes of its image (a local file is read and
    hashed; one that cannot be read has no key, so its failure is never reused)."""
    content: bytes | str | None = row.data
    try:
        if content is None and row.path:
            span = None if row.offset is None else (row.offset, row.length or 0)
            content = sha256(sources.read_inside(row.path, row.root, max_bytes, span)).hexdigest()
        mask = row.mask and sha256(sources.read_inside(row.mask, row.root, max_bytes)).hexdigest()
    except Rejected:
        return None
    fields = {"id": row.id, "caption": row.caption, "source": row.source, "url": row.url}
    if mask:  # an edited mask is fetched again
        fields["mask"] = mask
    return {**fields, "content": content, "metadata": row.metadata, "duplicate": duplicate}


def remembered(reason: str) -> bool:
    """Whether a failure may be reused by a later build: not when a retry tomorrow may succeed."""
    if reason.startswith("http_"):
        code = int(reason[5:]) if reason[5:].isdigit() else 500
        return code < 500 and code not in RETRIED_HTTP
    return reason not in TRANSIENT


class ShardRun:
    """Downloads and processes one shard, its rows concurrently."""

    def __init__(
        self,
        build: StageBuild,
        config: RunConfig,
        pool: ThreadHandoff,
        workers: int,
    ):
        self.build, self.pool, self.workers = build, pool, workers
        self.settings, self.source = config.download, config.source
        self.masked = config.train.masked_loss
        self.spec = ImageSpec(
            self.settings.resolution,
            self.settings.resize_mode,
            self.settings.image_format,
            self.settings.quality,
            self.settings.max_pixels,
        )
        self.fetcher: fetcher.Fetcher | None = None

    async def some(self, rows: list[SourceRow], duplicates: set[int]) -> list[Outcome]:
        """Fetch and process `rows` concurrently: their outcomes, in order.

        A fixed set of workers takes the rows in turn (`download.concurrency` of them for URLs), so
        a shard of thousands of rows never holds thousands of waiting coroutines."""
        network = self.source.kind == "urls"
        results: list[tuple[bool, dict]] = [(False, {})] * len(rows)
        todo = iter(enumerate(rows))

        async def worker() -> None:
            for i, row in todo:
                results[i] = await self._row(row, row.index in duplicates)

        width = min(len(rows), self.settings.concurrency if network else self.workers * 4)
        async with AsyncExitStack() as stack:
            if network:
                self.fetcher = await stack.enter_async_context(fetcher.Fetcher(self.settings))
            await asyncio.gather(*(worker() for _ in range(width)))
        return [
            Outcome(ok, value, remember=ok or remembered(value["reason"])) for ok, value in results
        ]

    async def _row(self, row: SourceRow, duplicate: bool) -> tuple[bool, dict]:
        try:
            if not row.id:
                raise Rejected("missing_id", f"no {self.source.id_column!r} value")
            if duplicate:
                raise Rejected("duplicate_id", f"{row.id!r} appeared in an earlier row")
            encoded, mask = await self._encoded(row)
        except Rejected as exc:
            failure = {"reason": exc.reason, "detail": netguard.redact_text(exc.detail)[:500]}
            result = (False, {"id": row.id or row_id(row.index), "source": row.source, **failure})
        else:
            result = (True, sample(row, encoded) | ({"mask": mask} if self.masked else {}))
        return result

    async def _encoded(self, row: SourceRow) -> tuple[imaging.Encoded, bytes | None]:
        """The processed image and, with `train.masked_loss`, its processed mask (or None)."""
        if self.fetcher is not None:
            data = await self.fetcher.fetch(row.url)
            if self.masked:
                return await self.pool.run(process_masked, data, None, self.spec)
            return await self.pool.run(process_image, data, self.spec), None
        limit = self.settings.max_bytes
        return await self.pool.run(load_and_process, row, self.spec, limit, self.masked)


def sample(row: SourceRow, encoded: imaging.Encoded) -> dict:
    return {
        "id": row.id,
        "image": encoded.data,
        "width": encoded.width,
        "height": encoded.height,
        "orig_width": encoded.orig_width,
        "orig_height": encoded.orig_height,
        "content_hash": encoded.content_hash,
        "caption": row.caption,
        "source": row.source,
        "metadata": row.metadata,
    }


def load_and_process(
    row: SourceRow, spec: ImageSpec, max_bytes: int, masked: bool = False
) -> tuple[imaging.Encoded, bytes | None]:
    """A local row (folder file, dataset bytes or path) read and processed in a worker thread;
    with `masked`, also its mask (`sdflow.data.masks`)."""
    data = row.data
    if data is None:
        if not row.path:
            raise Rejected("missing_image", "the sample has no image")
        span = None if row.offset is None else (row.offset, row.length or 0)
        data = sources.read_inside(row.path, row.root, max_bytes, span)
    elif len(data) > max_bytes:
        raise Rejected("too_large", f"{len(data)} bytes > download.max_bytes {max_bytes}")
    if not masked:
        return process_image(data, spec), None
    return process_masked(data, read_mask_file(row, max_bytes), spec)


def read_mask_file(row: SourceRow, max_bytes: int) -> bytes | None:
    """The bytes of the row's mask file (None: it has none); `undecodable_mask` if unreadable."""
    if row.mask is None:
        return None
    try:
        return sources.read_inside(row.mask, row.root, max_bytes)
    except Rejected as exc:
        raise Rejected("undecodable_mask", f"{exc.reason}: {exc.detail}") from None


def count_outputs(path: Path, names: list[str]) -> dict[str, Any]:
    """Counts over all shards, including those an interrupted earlier run finished."""
    kept = sum(pq.ParquetFile(path / name).metadata.num_rows for name in names)
    reasons: Counter[str] = Counter()
    for name in names:
        reasons.update(pq.read_table(path / FAILURES / name, columns=["reason"])[0].to_pylist())
    failed = sum(reasons.values())
    return {
        "input": kept + failed,
        "kept": kept,
        "failed": failed,
        "failed_by_reason": dict(sorted(reasons.items())),
    }


def describe_total_failure(config: RunConfig, counts: dict[str, Any]) -> str:
    reasons = sorted(counts["failed_by_reason"].items(), key=lambda item: -item[1])
    listed = ", ".join(f"{reason} x{n}" for reason, n in reasons[:5])
    hints = "; ".join(HINTS[r] for r, _ in reasons[:3] if r in HINTS)
    return (
        f"Every one of the {counts['input']} rows of {config.source.path} failed to download "
        f"({listed}).{' ' + hints + '.' if hints else ''} The failures with their reasons are in "
        f"the stage's partial directory under {FAILURES}/."
    )


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_async(make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a coroutine to completion, also when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(1) as runner:
        return runner.submit(asyncio.run, make()).result()
