"""Download throughput, sdflow's stage vs img2dataset, on the same loopback URL list and budget.

    .venv/bin/python bench/download.py [--images 2000] [--small-host] [--img2dataset-python PY]

A separate process serves N generated JPEGs (256x256 to 512x384, photo-like) from 127.0.0.1 with a
threaded stdlib HTTP server: keep-alive HTTP/1.1 with a deep listen backlog, or with `--small-host`
HTTP/1.0 (a connection per image) and a listen backlog of 5 (socketserver's default), like a small
image host. Both downloaders get the same list, output size (`--resolution`, center crop), format and
quality, shard size and processes x threads budget: img2dataset's `processes_count` x `thread_count`
(run in `--img2dataset-python`, the optional `bench` extra), sdflow's stage function with
`runner.max_workers` = processes shards in parallel and `download.concurrency` = threads per shard.
img2dataset has no per-host limit, so sdflow's `download.per_host_connections` is set to the whole
budget (processes x threads) too: the one loopback host stands for the many hosts of a real list.
`--per-host N` runs sdflow with a cap instead (16 is its default), for what politeness costs.
Each is timed around its download call (imports and server start-up excluded for both), in wall
seconds and in CPU seconds (img2dataset's with its worker processes): on a machine shared with other
work the wall-clock ratio moves with the load, the CPU per image much less. With `--repeats N` the
two alternate N times on the same server and the medians are compared. Prints images/s and CPU
seconds per 1,000 images for each, the ratios, and a JSON line, and leaves the comparisons for
`bench/summary.py` (`bench/results.py`).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from results import comparison, save  # bench/, beside this script

QUALITY = 95
PNG_LEVEL = 1  # img2dataset reads quality as the PNG compression level; sdflow writes level 1
SMALL_BACKLOG = 5
I2D_FORMATS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
SIZES = [(256, 256), (320, 256), (384, 288), (448, 336), (512, 384), (384, 512), (300, 400)]


def make_jpeg(index: int) -> bytes:
    """A photo-like JPEG: smooth colour field, shapes and noise (compresses like real images)."""
    rng = np.random.default_rng(index)
    width, height = SIZES[index % len(SIZES)]
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * rng.uniform(
        80, 255, 3
    )
    cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
    base[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def serve(count: int, ready: mp.Queue, small_host: bool, cache: str | None = None) -> None:
    images = generated(count, cache)
    serve_images(images.__getitem__, lambda port: (port, sum(map(len, images))), ready, small_host)


def generated(count: int, cache: str | None) -> list[bytes]:
    """`make_jpeg(0 .. count - 1)`, read from / kept in `cache/jpegs-<count>.pickle` if given."""
    path = Path(cache, f"jpegs-{count}.pickle") if cache else None
    if path is not None and path.exists():
        return pickle.loads(path.read_bytes())  # noqa: S301 - the bench's own file
    images = [make_jpeg(i) for i in range(count)]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(images))
    return images


def serve_images(body, announce, ready: mp.Queue, small_host: bool = False, counter=None) -> None:
    """Serve `body(index)` as image/jpeg at `/<index>.jpg` on 127.0.0.1 until killed; puts
    `announce(port)` on `ready` once listening; counts requests in `counter` (a shared int) if given."""

    class Handler(BaseHTTPRequestHandler):
        # keep-alive, as real image hosts do; the small host closes every connection (HTTP/1.0)
        protocol_version = "HTTP/1.0" if small_host else "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            if counter is not None:
                with counter.get_lock():
                    counter.value += 1
            data = body(int(self.path.rsplit("/", 1)[1].split(".")[0]))
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    class Server(ThreadingHTTPServer):
        request_queue_size = SMALL_BACKLOG if small_host else 1024
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    ready.put(announce(server.server_address[1]))
    server.serve_forever()


def pool_mapper(workers: int, processes: bool):
    """Shard jobs on `workers` threads (the default `runner.task_runner: threads`) or processes
    (what `runner.task_runner: processes`, or Dask with that many worker processes, does), results
    in job order."""

    def mapper(fn, jobs):
        pool = ProcessPoolExecutor(workers) if processes else ThreadPoolExecutor(workers)
        with pool:
            yield from pool.map(fn, jobs)

    return mapper


def per_host(args: argparse.Namespace) -> int:
    return args.per_host or args.processes * args.threads


def run_sdflow(args: argparse.Namespace, listing: Path, tmp: str) -> dict:
    from sdflow.config import RunConfig
    from tasks.download import download

    config = RunConfig.model_validate(
        {
            "source": {"kind": "urls", "path": str(listing)},
            "download": {
                "resolution": args.resolution,
                "resize_mode": "center_crop",
                "image_format": args.format,
                "quality": QUALITY,
                "allow_private_network": True,
                "concurrency": args.threads,
                "shard_size": args.shard_size,
                "retries": 0,
            }
            | (
                {}
                if getattr(args, "default_cap", False)
                else {"per_host_connections": per_host(args)}
            ),
            "runner": {"max_workers": args.processes},
        }
    )
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    manifest = download(
        config, {}, os.path.join(tmp, "sdflow"), pool_mapper(args.processes, args.shard_processes)
    )
    wall, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    kept = manifest["counts"]["kept"]
    return {"kept": kept, "failed": manifest["counts"]["failed"], "seconds": round(wall, 2),
            "images_per_second": round(kept / wall, 1), "cpu_seconds": round(cpu, 2)}  # fmt: skip


I2D_SCRIPT = """
import glob, json, resource, sys, time
import pyarrow.parquet as pq
from img2dataset import download
def cpu():  # this process and its reaped workers
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
options = json.loads(sys.argv[1])
cpu0, started = cpu(), time.perf_counter()
download(**options)
seconds, cpu_seconds = time.perf_counter() - started, cpu() - cpu0
files = glob.glob(options["output_folder"] + "/*.parquet")
kept = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
print(json.dumps({"kept": kept, "seconds": seconds, "cpu_seconds": round(cpu_seconds, 2)}))
"""


def run_img2dataset(args: argparse.Namespace, listing: Path, tmp: str) -> dict | None:
    """img2dataset on the same list and budget in `--img2dataset-python`, or None if missing."""
    python = args.img2dataset_python
    probe = subprocess.run([python, "-c", "import img2dataset"], capture_output=True)
    if probe.returncode != 0:
        return None
    options = {
        "url_list": str(listing), "input_format": "parquet", "url_col": "url",
        "caption_col": "caption", "output_format": "parquet",
        "output_folder": os.path.join(tmp, "img2dataset"), "processes_count": args.processes,
        "thread_count": args.threads, "image_size": args.resolution,
        "resize_mode": "center_crop", "encode_format": I2D_FORMATS[args.format],
        "encode_quality": PNG_LEVEL if args.format == "png" else QUALITY, "number_sample_per_shard": args.shard_size,
        "distributor": "multiprocessing", "retries": 0, "timeout": 10, "enable_wandb": False,
    }  # fmt: skip
    done = subprocess.run(
        [python, "-c", I2D_SCRIPT, json.dumps(options)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"img2dataset failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "seconds": round(result["seconds"], 2),
            "images_per_second": round(result["kept"] / result["seconds"], 1)}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    ready: mp.Queue = mp.Queue()
    server = mp.Process(
        target=serve, args=(args.images, ready, args.small_host, args.image_cache), daemon=True
    )
    server.start()
    port, total_bytes = ready.get(timeout=600)
    ours, peers = [], []
    try:
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="sdflow-bench-") as tmp:
                listing = Path(tmp) / "urls.parquet"
                urls = [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(args.images)]
                captions = [f"image {i}" for i in range(args.images)]
                pq.write_table(pa.table({"url": urls, "caption": captions}), listing)
                if not args.no_img2dataset:
                    peers.append(run_img2dataset(args, listing, tmp))
                ours.append(run_sdflow(args, listing, tmp))
    finally:
        server.terminate()
    peers = [peer for peer in peers if peer is not None]
    ours_rate = round(statistics.median(r["images_per_second"] for r in ours), 1)
    ours_cpu = statistics.median(r["cpu_seconds"] / r["kept"] * 1000 for r in ours)
    peer_cpu = (
        statistics.median(r["cpu_seconds"] / r["kept"] * 1000 for r in peers) if peers else None
    )
    peer_rate = (
        round(statistics.median(r["images_per_second"] for r in peers), 1) if peers else None
    )
    return {
        "images": args.images, "small_host": args.small_host, "format": args.format,
        "sdflow_shards_in": "processes" if args.shard_processes else "threads",
        "resolution": args.resolution, "budget": f"{args.processes}x{args.threads}",
        "per_host_cap": args.per_host,
        "mean_source_kib": round(total_bytes / args.images / 1024, 1), "repeats": args.repeats,
        "sdflow_images_per_second": ours_rate, "img2dataset_images_per_second": peer_rate,
        "ratio": round(ours_rate / peer_rate, 2) if peer_rate else None,
        "sdflow_cpu_s_per_1000": round(ours_cpu, 2),
        "img2dataset_cpu_s_per_1000": round(peer_cpu, 2) if peer_cpu else None,
        "sdflow": ours, "img2dataset": peers,
    }  # fmt: skip


def save_result(result: dict) -> None:
    """The comparison row for `bench/summary.py` (goal: 1.5x on a normal host, 1x on a small one)."""
    host = "small host" if result["small_host"] else "keep-alive host"
    shards = "" if result["sdflow_shards_in"] == "threads" else ", shards in processes"
    cap = f", sdflow per-host cap {result['per_host_cap']}" if result["per_host_cap"] else ""
    case = (f"{result['images']:,} JPEGs → {result['resolution']} px {result['format']}, {host}, "
            f"{result['budget']}{shards}{cap}, median of {result['repeats']}")  # fmt: skip
    row = comparison(
        case, "images/s", result["sdflow_images_per_second"], "img2dataset",
        result["img2dataset_images_per_second"], goal=goal(result),
    )  # fmt: skip
    suffix = ("-small-host" if result["small_host"] else "") + ("-processes" if shards else "")
    suffix += f"-cap{result['per_host_cap']}" if result["per_host_cap"] else ""
    name = f"download-{result['images']}{suffix}"
    cpu = comparison(
        f"{case}: CPU per 1,000 images", "CPU-s", result["sdflow_cpu_s_per_1000"],
        "img2dataset", result["img2dataset_cpu_s_per_1000"], higher_is_better=False,
    )  # fmt: skip
    save(name, "download", [row, cpu], result)


def goal(result: dict) -> float | None:
    """1.5x on a normal host, 1x on a small one, at the same budget; none under a per-host cap."""
    if result["per_host_cap"]:
        return None
    return 1.0 if result["small_host"] else 1.5


def _cpu_seconds() -> float:
    """This process's CPU seconds and its reaped children's (the shard worker processes)."""
    usages = map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--format", choices=sorted(I2D_FORMATS), default="jpeg")
    parser.add_argument(
        "--processes", type=int, default=2, help="img2dataset processes; shards in parallel"
    )
    parser.add_argument(
        "--threads", type=int, default=64, help="img2dataset threads; connections per shard"
    )
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument(
        "--per-host", type=int, help="sdflow's per-host connection cap (default: the budget)"
    )
    parser.add_argument(
        "--small-host", action="store_true", help=f"HTTP/1.0, listen backlog {SMALL_BACKLOG}"
    )
    parser.add_argument(
        "--img2dataset-python", default=sys.executable, help="a Python with img2dataset"
    )
    parser.add_argument("--no-img2dataset", action="store_true", help="sdflow alone")
    parser.add_argument("--repeats", type=int, default=1, help="alternate both N times; medians")
    parser.add_argument("--image-cache", help="keep the generated JPEGs in this folder for reuse")
    parser.add_argument(
        "--shard-processes",
        action="store_true",
        help="sdflow's shards in processes (runner.task_runner: processes), not threads",
    )
    result = run(parser.parse_args())
    save_result(result)
    where = "small host" if result["small_host"] else "keep-alive host"
    print(f"{result['images']} images, {where}, {result['format']} {result['resolution']} px, "
          f"budget {result['budget']}, median of {result['repeats']}")  # fmt: skip
    rates = [r["images_per_second"] for r in result["sdflow"]]
    print(f"  sdflow      {result['sdflow_images_per_second']:>8} images/s (runs: {rates})")
    if not result["img2dataset"]:
        print(
            "  img2dataset  not installed here (pip install -e '.[bench]'); sdflow's figure alone"
        )
    else:
        rates = [r["images_per_second"] for r in result["img2dataset"]]
        print(
            f"  img2dataset {result['img2dataset_images_per_second']:>8} images/s (runs: {rates})"
        )
        print(f"  ratio        {result['ratio']}x")
        print(f"  CPU seconds per 1,000 images: sdflow {result['sdflow_cpu_s_per_1000']}, "
              f"img2dataset {result['img2dataset_cpu_s_per_1000']}")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
