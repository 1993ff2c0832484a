"""Data stages at scale: peak memory from 2k to 20k rows, and the cost of a 1 % nightly append.

    .venv/bin/python bench/data_scale.py [--rows 2000 20000] [--shard-size 1000]

A separate process serves one small distinct JPEG per row from 127.0.0.1 and counts the requests.
For each row count, a fresh child process runs download -> filter -> caption (keep) over a URL list of
that many rows (the stage functions, threads for shards as the default runner), and reports its wall
time per stage and its peak RSS; then the list grows by 1 % and the same workdir runs again: the
requests the server saw, and the rows each stage computed (`rows_fetched` / `rows_computed`), show
that the rerun's work is the new rows. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
from pathlib import Path

from download import serve_images  # bench/ is on sys.path when run as a script
from PIL import Image
from results import comparison, save


def image(index: int) -> bytes:
    """A 96x96 JPEG that no other row has (colour and a square placed by the index)."""
    picture = Image.new("RGB", (96, 96), (index % 251, (index // 251) % 251, (index * 7) % 251))
    offset = index % 64
    picture.paste(
        (255 - index % 251, 40, 200), (offset, offset // 2, offset + 24, offset // 2 + 24)
    )
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def serve(ready: mp.Queue, counter) -> None:
    serve_images(image, lambda port: port, ready, counter=counter)


CHILD = """
import json, resource, sys, time
from sdflow.config import RunConfig
from tasks.download import download
from tasks.filter import filter_samples
from tasks.caption import caption_samples
from sdflow.ops.orchestration import shard_mapper
listing, workdir, shard_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = RunConfig.model_validate({
    "source": {"kind": "urls", "path": listing},
    "download": {"resolution": 64, "resize_mode": "center_crop", "image_format": "jpeg",
                 "allow_private_network": True, "shard_size": shard_size, "retries": 0},
    "filter": {"min_size": 32},
    "caption": {"backend": "keep"},
})
seconds, info = {}, {}
started = time.perf_counter()
manifest = download(config, {}, workdir)
seconds["download"], info["rows_fetched"] = time.perf_counter() - started, manifest["info"]["rows_fetched"]
started = time.perf_counter()
kept = filter_samples(config, {"download": manifest}, workdir)
seconds["filter"] = time.perf_counter() - started
started = time.perf_counter()
captioned = caption_samples(config, {"filter": kept}, workdir)
seconds["caption"], info["captioned_now"] = time.perf_counter() - started, captioned["info"]["rows_computed"]
peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_mib": round(peak_mib, 1), "kept": captioned["counts"]["kept"], **info}))
"""


def write_list(path: Path, port: int, rows: int) -> Path:
    lines = ["url,caption"] + [
        f"http://127.0.0.1:{port}/{i}.jpg,a picture of row {i} in a bench" for i in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def child(listing: Path, workdir: Path, shard_size: int) -> dict:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(listing), str(workdir), str(shard_size)],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(rows: int, port: int, counter, shard_size: int, tmp: Path) -> dict:
    workdir = tmp / f"work-{rows}"
    first = child(write_list(tmp / f"list-{rows}.csv", port, rows), workdir, shard_size)
    grown = rows + rows // 100
    before = counter.value
    second = child(write_list(tmp / f"list-{grown}.csv", port, grown), workdir, shard_size)
    return {
        "rows": rows,
        "first": first,
        "append_1pct": {**second, "requests": counter.value - before, "new_rows": grown - rows},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args()
    ready, counter = mp.Queue(), mp.Value("i", 0)
    server = mp.Process(target=serve, args=(ready, counter), daemon=True)
    server.start()
    port = ready.get(timeout=60)
    results = []
    with tempfile.TemporaryDirectory(prefix="sdflow-scale-") as tmp:
        for rows in args.rows:
            results.append(measure(rows, port, counter, args.shard_size, Path(tmp)))
    server.terminate()
    print(f"{'rows':>7} {'download s':>10} {'filter s':>8} {'caption s':>9} {'peak MiB':>8} | "
          f"{'+1% rows':>8} {'requests':>8} {'fetched':>7} {'captioned':>9} {'rerun s':>7}")  # fmt: skip
    for r in results:
        first, again = r["first"], r["append_1pct"]
        print(f"{r['rows']:>7} {first['seconds']['download']:>10.1f} {first['seconds']['filter']:>8.1f} "
              f"{first['seconds']['caption']:>9.1f} {first['peak_mib']:>8.0f} | {again['new_rows']:>8} "
              f"{again['requests']:>8} {again['rows_fetched']:>7} {again['captioned_now']:>9} "
              f"{sum(again['seconds'].values()):>7.1f}")  # fmt: skip
    if len(results) > 1:
        growth = results[-1]["first"]["peak_mib"] / results[0]["first"]["peak_mib"] - 1
        print(
            f"peak memory growth {results[0]['rows']} -> {results[-1]['rows']} rows: {growth:+.1%}"
        )
    save("data-scale", "data_scale", summary_rows(results), results)
    print(json.dumps(results))


def summary_rows(results: list[dict]) -> list[dict]:
    """sdflow's own figures for `bench/summary.py` (no peer): peak memory, and what a 1 % append
    re-requests per new row (1 = only the new rows)."""
    rows = [comparison(f"data stages, {r['rows']:,} rows: peak memory", "MiB",
                       r["first"]["peak_mib"]) for r in results]  # fmt: skip
    again = results[-1]["append_1pct"]
    rows.append(
        comparison(f"1 % append to {results[-1]['rows']:,} rows: requests per new row", "",
                   round(again["requests"] / again["new_rows"], 2))
    )  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
