"""Download-stage throughput: N generated JPEGs served from 127.0.0.1, fetched, resized, stored.

    .venv/bin/python bench/download.py --images 2000

A separate process serves the images (256x256 to 512x384 JPEGs, generated in memory) with a threaded
stdlib HTTP server; this process runs the real stage function (`tasks.download.download`) at
resolution 256 with center_crop, like a LAION fetch. Prints a readable line and a JSON line:
images/s, and two per-core views: images/s divided by the usable cores (the server shares them), and
images per CPU-second spent by the stage process itself. img2dataset reports ~100 images/s per core.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import resource
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

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


def serve(count: int, ready: mp.Queue) -> None:
    images = [make_jpeg(i) for i in range(count)]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real image hosts do

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            body = images[int(self.path.rsplit("/", 1)[1].split(".")[0])]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    ready.put((server.server_address[1], sum(map(len, images))))
    server.serve_forever()


def run(args: argparse.Namespace) -> dict:
    from sdflow.config import RunConfig
    from tasks.download import available_cpus, download

    ready: mp.Queue = mp.Queue()
    server = mp.Process(target=serve, args=(args.images, ready), daemon=True)
    server.start()
    port, total_bytes = ready.get(timeout=600)
    try:
        with tempfile.TemporaryDirectory(prefix="sdflow-bench-") as tmp:
            listing = Path(tmp) / "urls.parquet"
            urls = [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(args.images)]
            pq.write_table(
                pa.table({"url": urls, "caption": [f"image {i}" for i in urls]}), listing
            )
            config = RunConfig.model_validate(
                {
                    "source": {"kind": "urls", "path": str(listing)},
                    "download": {
                        "resolution": 256,
                        "resize_mode": "center_crop",
                        "image_format": args.format,
                        "allow_private_network": True,
                        "concurrency": args.concurrency,
                        "decode_workers": args.workers,
                        "shard_size": args.shard_size,
                    },
                }
            )
            cpu0, wall0 = _cpu_seconds(), time.perf_counter()
            manifest = download(config, {}, os.path.join(tmp, "work"))
            wall, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    finally:
        server.terminate()
    cores = available_cpus()
    kept = manifest["counts"]["kept"]
    return {
        "images": args.images,
        "kept": kept,
        "failed": manifest["counts"]["failed"],
        "format": args.format,
        "mean_source_kib": round(total_bytes / args.images / 1024, 1),
        "seconds": round(wall, 2),
        "images_per_second": round(kept / wall, 1),
        "cores": cores,
        "images_per_second_per_core": round(kept / wall / cores, 1),
        "stage_cpu_seconds": round(cpu, 2),
        "images_per_stage_cpu_second": round(kept / cpu, 1),
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--format", choices=["png", "jpeg", "webp"], default="png")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="decode threads; 0 = one per core")
    parser.add_argument("--shard-size", type=int, default=500)
    result = run(parser.parse_args())
    print(
        f"{result['kept']}/{result['images']} images in {result['seconds']} s: "
        f"{result['images_per_second']} images/s, {result['images_per_second_per_core']} per core "
        f"({result['cores']} cores), {result['images_per_stage_cpu_second']} per stage CPU-second"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
