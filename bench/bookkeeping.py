"""Row bookkeeping at scale: reuse lookups, the dataset report and gc over 1M to 100M rows of records.

    .venv/bin/python bench/bookkeeping.py [--rows 1000000 10000000 100000000] [--shard-size 1000]
        [--parts reuse report gc] [--old-join-max 1000000] [--lookups 20] [--workdir DIR]

No downloads and no models: for each row count N the bench writes a workdir by hand, the way the
stages leave it: a published filter output whose `rows/` records N input rows (random 16-byte keys,
90 % kept, 10 % failed as too small, too wide or duplicate of a few kept rows, with the filter's
per-row facts) and, for the report, its kept shards and failure tables and a caption output of the
kept rows (captions, sizes and a tiny image each). The synthesis is column-wise, shard by shard (no
Python per row: about 2 ms of CPU per 1,000-row record file, 6 ms with the report's files), and
writes what the stages' writers would (tests/bench/test_bookkeeping.py). Then each measurement runs
in a fresh child process, which prints its wall and CPU time and its peak RSS (`ru_maxrss` is a
high-water mark of the whole process, hence one process per measurement; `--child PART` with
`--keep`'s workdir measures one part again):

- reuse: a new build's `Memo` of the filter stage; the first shard's lookup (which writes the
  output's key index, once per output: `sdflow.store.rowindex`), then `--lookups` shards of 1,000
  keys spread over the records, 99 % of them recorded, each checked against the keys written;
- old join (N <= --old-join-max): the same lookups the way reuse did them before the index (every
  record of the output in one in-memory table, each shard joined against it), as the peer;
- report: `build_report` over the filter and caption outputs;
- gc: `collect_garbage(dry_run=True)` with one run referencing both outputs (it walks them).

The goal is a lookup cost per shard and peak memory flat in N. Prints a table and a JSON line, and
leaves `bookkeeping.json` for bench/summary.py (bench/results.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from results import comparison, save  # bench/, beside this script

ROOT = Path(__file__).resolve().parents[1]
FILTER_KEY, CAPTION_KEY = "bench-filter", "bench-caption"
PARTS = ("reuse", "report", "gc")
MISSING = 0.01  # share of a looked-up shard's keys that no output recorded
WORDS = ("red", "blue", "green", "tiny", "large", "old", "new", "cat",
         "dog", "house", "tree", "car", "boat", "sky", "river", "road")  # fmt: skip
PNG = bytes.fromhex(  # a 1x1 PNG
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8"
    "ffff3f0005fe02fedccc59e70000000049454e44ae426082"
)


# --------------------------------------------------------------------------- synthesised workdir


def key_bytes(shard: int, size: int) -> bytes:
    """The keys of input shard `shard`, 16 bytes each (seeded, so a child can recompute them)."""
    return np.random.default_rng([7, shard]).bytes(16 * size)


def shard_keys(shard: int, size: int) -> list[bytes]:
    raw = key_bytes(shard, size)
    return [raw[i : i + 16] for i in range(0, len(raw), 16)]


def record_table(shard: int, size: int) -> pa.Table:
    """Shard `shard`'s row record as the filter writes it (`sdflow.store.reuse.record_rows`), built
    column-wise: every 10th row failed (too small, too wide, duplicate in turn), the rest kept."""
    name = f"shard-{shard:05d}.parquet"
    rows = np.arange(size)
    failed = rows % 10 == 0
    kind = (rows // 10) % 3
    keys = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(16), size, [None, pa.py_buffer(key_bytes(shard, size))]
    )
    positions = np.where(failed, np.cumsum(failed) - 1, np.cumsum(~failed) - 1)
    checked = ~failed | (kind == 2)  # a duplicate passed its own checks
    return pa.table({
        "key": keys,
        "file": pa.array(np.where(failed, f"failures/{name}", name)),
        "position": pa.array(positions, pa.int32()),
        "check": pa.array(np.array(["too_small", "aspect_ratio", ""])[kind], mask=checked),
        "check_detail": pa.array(np.array(["8x8 original", "ratio 3.00 > 2.0", ""])[kind], mask=checked),
        "phash": pa.array(shard * size + rows).cast(pa.string()),
    })  # fmt: skip


def text(*parts: Any) -> pa.Array:
    """Strings joined element-wise from constants and number arrays (column-wise, no Python loop)."""
    arrays = [
        pa.array(np.asarray(p)).cast(pa.string()) if isinstance(p, np.ndarray) else p for p in parts
    ]
    return pc.binary_join_element_wise(*arrays, "")


def write_shard(base: Path, caption: Path, shard: int, size: int, records_only: bool) -> int:
    """One input shard's record (and, for the report, its kept, failed and captioned rows):
    returns how many rows it kept."""
    name = f"shard-{shard:05d}.parquet"
    pq.write_table(record_table(shard, size), base / "rows" / name, compression="zstd")
    rows = np.arange(size)
    failed = rows % 10 == 0
    if records_only:
        return int((~failed).sum())
    ids = text(f"{shard}-", rows)
    bad, kind = rows[failed], (rows[failed] // 10) % 3
    reasons = pa.array(np.array(["too_small", "aspect_ratio", "duplicate"])[kind])
    details = pc.case_when(
        pc.make_struct(pa.array(kind == 0), pa.array(kind == 1)),
        text("8x8 original, shorter side < ", 16 + bad % 7),
        text("ratio ", 2 + (bad % 50) // 10, ".", bad % 10, "0 > 2.0"),
        pa.array([f"{shard % 50}-1"] * len(bad)),
    )
    failures = {"id": ids.filter(pa.array(failed)), "source": pa.array(["bench"] * len(bad)),
                "reason": reasons, "detail": details}  # fmt: skip
    pq.write_table(pa.table(failures), base / "failures" / name, compression="zstd")
    kept = rows[~failed]
    images = pa.array([PNG] * len(kept), pa.binary())
    kept_ids = ids.filter(pa.array(~failed))
    pq.write_table(pa.table({"id": kept_ids, "image": images}), base / name, compression="zstd")
    words = pa.array(WORDS)
    captioned = {
        "id": kept_ids,
        "caption": text("a ", words.take(kept % 16), " ", words.take((kept * 7 + shard) % 16), " photo number ", kept),
        "width": pa.array(64 + kept % 900, pa.int32()),
        "height": pa.array(64 + (kept * 3) % 700, pa.int32()),
        "image": images,
    }  # fmt: skip
    pq.write_table(pa.table(captioned), caption / name, compression="zstd")
    return len(kept)


def synthesise(workdir: Path, rows: int, size: int, records_only: bool) -> dict:
    """The filter and caption outputs of `rows` input rows; returns their manifests."""
    base = workdir / "stages" / "filter" / FILTER_KEY
    caption = workdir / "stages" / "caption" / CAPTION_KEY
    for folder in (base / "rows", base / "failures", caption):
        folder.mkdir(parents=True, exist_ok=True)
    shards = -(-rows // size)
    kept = sum(
        write_shard(base, caption, s, min(size, rows - s * size), records_only)
        for s in range(shards)
    )
    names = [f"shard-{s:05d}.parquet" for s in range(shards)]
    failed = rows - kept
    reasons = {r: len(range(k, failed, 3)) for k, r in enumerate(("too_small", "aspect_ratio", "duplicate"))}  # fmt: skip
    manifests = {
        "filter": manifest("filter", FILTER_KEY, {"input": rows, "kept": kept, "failed_by_reason": reasons}, names, {"failures": "failures"}),
        "caption": manifest("caption", CAPTION_KEY, {"input": kept, "kept": kept}, names, {}),
    }  # fmt: skip
    for stage, key in (("filter", FILTER_KEY), ("caption", CAPTION_KEY)):
        folder = workdir / "stages" / stage / key
        (folder / "MANIFEST.json").write_text(json.dumps(manifests[stage]))
    run = workdir / "runs" / "r1"
    run.mkdir(parents=True, exist_ok=True)
    paths = {stage: m["path"] for stage, m in manifests.items()}
    (run / "summary.json").write_text(json.dumps({"started_at": "2026-01-01", "outputs": paths}))
    return manifests


def manifest(stage: str, key: str, counts: dict, shards: list[str], files: dict) -> dict:
    return {"stage": stage, "key": key, "schema_version": 1, "fingerprint": key,
            "path": f"stages/{stage}/{key}", "seconds": 0, "counts": counts,
            "shards": shards, "files": files, "info": {}}  # fmt: skip


# ------------------------------------------------------------------------------ child processes


def lookup_shards(rows: int, size: int, count: int) -> list[int]:
    shards = -(-rows // size)
    return sorted({round(i * (shards - 1) / max(count - 1, 1)) for i in range(count)})


def wanted(shard: int, size: int) -> tuple[list[bytes], int]:
    """A new build's keys for input shard `shard`: its recorded keys, `MISSING` of them replaced
    by keys nobody recorded; and how many are recorded."""
    keys = shard_keys(shard, size)
    fresh = np.random.default_rng([8, shard]).bytes(16 * len(keys))
    step = round(1 / MISSING)
    for j in range(0, len(keys), step):
        keys[j] = fresh[16 * j : 16 * j + 16]
    return keys, len(keys) - len(range(0, len(keys), step))


def child_reuse(workdir: Path, rows: int, size: int, lookups: int) -> dict:
    from sdflow.store.reuse import Memo

    memo = Memo(workdir, "filter", exclude="a-new-build")
    started, cpu_started = time.perf_counter(), time.process_time()
    first = memo.facts(wanted(0, size)[0])  # writes the output's key index
    index_seconds, index_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    seconds, cpu = [], []
    for shard in lookup_shards(rows, size, lookups):
        keys, recorded = wanted(shard, size)
        started, cpu_started = time.perf_counter(), time.process_time()
        facts = memo.facts(keys)
        seconds.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
        if len(facts) != recorded:
            raise AssertionError(f"shard {shard}: {len(facts)} found, {recorded} recorded")
    return {"first_lookup_s": index_seconds, "first_lookup_cpu_s": index_cpu,
            "first_found": len(first), **spread(seconds, cpu)}  # fmt: skip


def child_old_join(workdir: Path, rows: int, size: int, lookups: int) -> dict:
    """The lookups as reuse did them before the key index: every record in one table, joined."""
    base = workdir / "stages" / "filter" / FILTER_KEY
    started = time.perf_counter()
    parts = []
    for path in sorted((base / "rows").glob("*.parquet")):
        part = pq.read_table(path)
        files = pa.array([str(base / name) for name in part.column("file").to_pylist()])
        part = part.set_column(part.schema.get_field_index("file"), "file", files)
        parts.append(part.append_column("newest", pa.array([0] * part.num_rows, pa.int32())))
    records = pa.concat_tables(parts)
    load_seconds = time.perf_counter() - started
    seconds, cpu = [], []
    for shard in lookup_shards(rows, size, lookups):
        keys, recorded = wanted(shard, size)
        started, cpu_started = time.perf_counter(), time.process_time()
        query = pa.table({"key": pa.array(keys, pa.binary(16)), "row": pa.array(range(len(keys)))})
        joined = query.join(records, "key", join_type="inner")
        found: dict = {}
        for record in joined.sort_by([("row", "ascending"), ("newest", "ascending")]).to_pylist():
            found.setdefault(record.pop("row"), record)
        seconds.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
        if len(found) != recorded:
            raise AssertionError(f"shard {shard}: {len(found)} found, {recorded} recorded")
    return {"load_s": load_seconds, **spread(seconds, cpu)}


def child_report(workdir: Path) -> dict:
    from sdflow.data.report import build_report

    manifests = {
        stage: json.loads((workdir / "stages" / stage / key / "MANIFEST.json").read_text())
        for stage, key in (("filter", FILTER_KEY), ("caption", CAPTION_KEY))
    }
    started, cpu = time.perf_counter(), time.process_time()
    build_report(workdir, manifests, workdir / "runs" / "r1")
    return {"seconds": time.perf_counter() - started, "cpu_s": time.process_time() - cpu}


def child_gc(workdir: Path) -> dict:
    from sdflow.store.gc import collect_garbage

    started, cpu = time.perf_counter(), time.process_time()
    report = collect_garbage(workdir, keep_runs=1, dry_run=True)
    return {"seconds": time.perf_counter() - started, "cpu_s": time.process_time() - cpu,
            "kept": report.kept}  # fmt: skip


def spread(seconds: list[float], cpu: list[float]) -> dict:
    """Median and worst wall time of the lookups, and their median CPU time (the process's, all
    threads: on a shared machine the steadier figure)."""
    return {"lookup_ms_median": 1000 * float(np.median(seconds)),
            "lookup_ms_max": 1000 * max(seconds), "lookup_cpu_ms_median": 1000 * float(np.median(cpu)),
            "lookups": len(seconds)}  # fmt: skip


def run_child(part: str, workdir: Path, rows: int, size: int, lookups: int) -> dict:
    """`part` in a fresh process: its result and its peak RSS."""
    command = [sys.executable, __file__, "--child", part, "--workdir", str(workdir),
               "--rows", str(rows), "--shard-size", str(size), "--lookups", str(lookups)]  # fmt: skip
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}  # this checkout's sdflow, not an installed one
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{part} at {rows} rows failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_main(args: argparse.Namespace) -> None:
    import resource

    workdir, rows = Path(args.workdir), args.rows[0]
    work = {
        "reuse": lambda: child_reuse(workdir, rows, args.shard_size, args.lookups),
        "old-join": lambda: child_old_join(workdir, rows, args.shard_size, args.lookups),
        "report": lambda: child_report(workdir),
        "gc": lambda: child_gc(workdir),
    }[args.child]
    result = work()
    result["peak_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))


# ------------------------------------------------------------------------------------ the bench


def measure(rows: int, args: argparse.Namespace, root: Path) -> dict:
    workdir = root / f"rows-{rows}"
    shutil.rmtree(workdir, ignore_errors=True)
    started, cpu = time.perf_counter(), time.process_time()
    records_only = "report" not in args.parts
    synthesise(workdir, rows, args.shard_size, records_only)
    result: dict = {"rows": rows, "synthesis_s": round(time.perf_counter() - started, 1),
                    "synthesis_cpu_s": round(time.process_time() - cpu, 1)}  # fmt: skip
    for part in args.parts:
        result[part] = run_child(part, workdir, rows, args.shard_size, args.lookups)
    if "reuse" in args.parts and rows <= args.old_join_max:
        result["old-join"] = run_child("old-join", workdir, rows, args.shard_size, args.lookups)
    result["disk_mib"] = round(
        sum(f.stat().st_size for f in workdir.rglob("*") if f.is_file()) / 2**20
    )
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def table(results: list[dict]) -> str:
    head = ("| rows | index build s | lookup ms/shard (max) | lookup CPU ms/shard | reuse peak MiB | "
            "old join ms/shard (CPU) | old join peak MiB | report s (CPU) | report peak MiB | gc s (CPU) | "
            "gc peak MiB |")  # fmt: skip
    lines = [head, "|" + "---:|" * 11]
    for r in results:
        reuse, old = r.get("reuse"), r.get("old-join")
        report, gc = r.get("report"), r.get("gc")
        cells = [
            f"{r['rows']:,}",
            f"{reuse['first_lookup_s']:.1f}" if reuse else "—",
            f"{reuse['lookup_ms_median']:.1f} ({reuse['lookup_ms_max']:.1f})" if reuse else "—",
            f"{reuse['lookup_cpu_ms_median']:.1f}" if reuse else "—",
            f"{reuse['peak_mib']:.0f}" if reuse else "—",
            f"{old['lookup_ms_median']:.0f} ({old['lookup_cpu_ms_median']:.0f})" if old else "—",
            f"{old['peak_mib']:.0f}" if old else "—",
            f"{report['seconds']:.1f} ({report['cpu_s']:.1f})" if report else "—",
            f"{report['peak_mib']:.0f}" if report else "—",
            f"{gc['seconds']:.2f} ({gc['cpu_s']:.2f})" if gc else "—",
            f"{gc['peak_mib']:.0f}" if gc else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_rows(results: list[dict]) -> list[dict]:
    """For bench/summary.py: per row count, the lookup cost per shard against the old in-memory
    join where it was measured, and the peak memory of each part."""
    rows = []
    for r in results:
        n = f"{r['rows']:,} rows"
        if "reuse" in r:
            old = r.get("old-join")
            rows.append(comparison(f"reuse lookup per {1000:,}-key shard, {n}", "ms",
                                   round(r["reuse"]["lookup_ms_median"], 2),
                                   "in-memory join (before)" if old else None,
                                   round(old["lookup_ms_median"], 2) if old else None,
                                   higher_is_better=False))  # fmt: skip
        for part in PARTS:
            if part in r:
                rows.append(comparison(f"{part} peak memory, {n}", "MiB", r[part]["peak_mib"],
                                       higher_is_better=False))  # fmt: skip
    return rows


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--lookups", type=int, default=20, help="shards looked up per row count")
    parser.add_argument("--old-join-max", type=int, default=1_000_000,
                        help="largest row count at which the old in-memory join is measured")  # fmt: skip
    parser.add_argument("--workdir", help="where the synthesised workdirs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="leave the synthesised workdirs")
    parser.add_argument("--child", choices=[*PARTS, "old-join"],
                        help="measure one part in this process on the workdir --workdir names "
                             "(one a --keep run left: its rows-N folder), with --rows N")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    if args.child:
        child_main(args)
        return []
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="sdflow-bookkeeping-", dir=args.workdir))
    try:
        results = []
        for rows in args.rows:
            results.append(measure(rows, args, tmp))
            print(json.dumps(results[-1]), flush=True)  # each row count's result as it comes
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(table(results))
    save("bookkeeping", "bookkeeping", summary_rows(results), results)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
