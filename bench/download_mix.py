"""Download throughput on a mix of hosts like a real URL list, sdflow vs img2dataset.

    .venv/bin/python bench/download_mix.py [--images 2000] [--repeats 3] [--matched 2x64]

LAION-like: a few hosts hold most rows and a long tail of hosts holds one or two each. One server
process (asyncio) listens on many loopback addresses, one per host, each with its behaviour:

- `big-1..3` (127.0.0.2-4): keep-alive HTTP/1.1, answers at once: 40 %, 20 %, 10 % of the rows;
- `small-1..2` (127.0.0.5-6): HTTP/1.0 (a connection per image), serves two requests at a time
  (others queue, 10 ms each): a small host that slows when pushed, 5 % each;
- `slow` (127.0.0.7): keep-alive, 300 ms per answer, 5 %;
- `refusing` (127.0.0.8): nothing listens (connection refused), 2.5 %;
- the tail (127.0.1.x, 127.0.2.x): the remaining 12.5 % on hosts of one or two rows each,
  keep-alive, a third of them 100 ms per answer.

The rows are shuffled (seeded). Each downloader runs at its own defaults (img2dataset:
`processes_count` 1, `thread_count` 256, one shard of 10,000; sdflow: the `download` and `runner`
defaults: 4 shards in flight, `concurrency` 64 each, `per_host_connections` 16 adapting) and, with
`--matched PxT`, both at P processes x T threads (sdflow: P shards of T connections). Both resize to
64 px JPEG, retries 0 (sdflow still retries refused connects: `download.connect_retries`). Timed
around the download call, alternated, medians of `--repeats`; the JPEGs come from
`bench/download.py`. Results go to `bench/summary.py` (target: 2x img2dataset at defaults).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import statistics
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from download import generated, run_img2dataset, run_sdflow  # bench/, beside this script
from results import comparison, save

# name, address, share of rows, keep-alive, seconds per answer, requests served at once (0: any)
HOSTS = [
    ("big-1", "127.0.0.2", 0.40, True, 0.0, 0),
    ("big-2", "127.0.0.3", 0.20, True, 0.0, 0),
    ("big-3", "127.0.0.4", 0.10, True, 0.0, 0),
    ("small-1", "127.0.0.5", 0.05, False, 0.01, 2),
    ("small-2", "127.0.0.6", 0.05, False, 0.01, 2),
    ("slow", "127.0.0.7", 0.05, True, 0.3, 0),
    ("refusing", "127.0.0.8", 0.025, True, 0.0, 0),
]
TAIL_SHARE = 0.125


def tail_hosts(rows: int) -> list[tuple]:
    """Hosts of one or two rows each for `rows` rows: every third answers in 100 ms."""
    hosts, left, i = [], rows, 0
    while left > 0:
        n = min(left, 1 + i % 2)
        address = f"127.0.{1 + i // 250}.{1 + i % 250}"
        hosts.append((f"tail-{i}", address, n, True, 0.1 if i % 3 == 0 else 0.0, 0))
        left, i = left - n, i + 1
    return hosts


def plan(images: int) -> tuple[list[tuple], list[int]]:
    """(hosts with their row counts, the host index of each row, shuffled)."""
    hosts = [(n, a, round(share * images), k, d, c) for n, a, share, k, d, c in HOSTS]
    tail = tail_hosts(images - sum(h[2] for h in hosts))
    hosts += tail
    rows = [i for i, host in enumerate(hosts) for _ in range(host[2])]
    random.Random(0).shuffle(rows)
    return hosts, rows


async def _serve(hosts: list[tuple], images: list[bytes], ready: mp.Queue) -> None:
    ports = {}
    for name, address, _rows, keep_alive, delay, at_once in hosts:
        if name == "refusing":
            ports[name] = 9  # nothing listens on 127.0.0.8:9: refused
            continue
        gate = asyncio.Semaphore(at_once) if at_once else None
        handler = _handler(images, keep_alive, delay, gate)
        server = await asyncio.start_server(handler, address, 0, backlog=1024)
        ports[name] = server.sockets[0].getsockname()[1]
    ready.put(ports)
    await asyncio.Event().wait()


def _handler(images: list[bytes], keep_alive: bool, delay: float, gate):
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                index = int(head.split(b" ", 2)[1].rsplit(b"/", 1)[1].split(b".")[0])
                if gate is not None:
                    async with gate:
                        await asyncio.sleep(delay)
                elif delay:
                    await asyncio.sleep(delay)
                body = images[index % len(images)]
                version = b"HTTP/1.1" if keep_alive else b"HTTP/1.0"
                closing = b"" if keep_alive else b"Connection: close\r\n"
                writer.write(version + b" 200 OK\r\nContent-Type: image/jpeg\r\n" + closing
                             + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
                await writer.drain()
                if not keep_alive:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return answer


def serve(hosts: list[tuple], count: int, ready: mp.Queue, cache: str | None) -> None:
    images = generated(count, cache)
    asyncio.run(_serve(hosts, images, ready))


def listing(path: Path, hosts: list[tuple], rows: list[int], ports: dict[str, int]) -> None:
    urls = [f"http://{hosts[h][1]}:{ports[hosts[h][0]]}/{i}.jpg" for i, h in enumerate(rows)]
    captions = [f"image {i}" for i in range(len(rows))]
    pq.write_table(pa.table({"url": urls, "caption": captions}), path)


def settings(images: int, budget: str | None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(sdflow's, img2dataset's) arguments for `bench/download.py`'s runners: defaults, or P x T."""
    common = dict(resolution=64, format="jpeg", shard_processes=False, images=images)
    if budget:
        processes, threads = map(int, budget.split("x"))
        ours = argparse.Namespace(**common, processes=processes, threads=threads, shard_size=1000,
                                  per_host=None, default_cap=True)  # fmt: skip
        theirs = argparse.Namespace(**common, processes=processes, threads=threads, shard_size=1000)
    else:
        ours = argparse.Namespace(**common, processes=4, threads=64, shard_size=1000,
                                  per_host=None, default_cap=True)  # fmt: skip
        theirs = argparse.Namespace(**common, processes=1, threads=256, shard_size=10000)
    return ours, theirs


def measure(args: argparse.Namespace, budget: str | None, ports, hosts, rows) -> dict:
    ours_args, their_args = settings(args.images, budget)
    their_args.img2dataset_python = args.img2dataset_python
    ours, theirs = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="sdflow-mix-") as tmp:
            path = Path(tmp) / "urls.parquet"
            listing(path, hosts, rows, ports)
            peer = run_img2dataset(their_args, path, tmp)
            if peer is not None:
                theirs.append(peer)
            ours.append(run_sdflow(ours_args, path, tmp))
            print(f"  {budget or 'defaults'}: sdflow {ours[-1]}, img2dataset {peer}", flush=True)
    rate = statistics.median(r["images_per_second"] for r in ours)
    peer_rate = statistics.median(r["images_per_second"] for r in theirs) if theirs else None
    return {
        "budget": budget or "defaults", "sdflow_images_per_second": round(rate, 1),
        "img2dataset_images_per_second": round(peer_rate, 1) if peer_rate else None,
        "ratio": round(rate / peer_rate, 2) if peer_rate else None, "sdflow": ours,
        "img2dataset": theirs,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--matched", default="2x64", help="PxT for both; '' to skip")
    parser.add_argument("--img2dataset-python", default=sys.executable)
    parser.add_argument("--image-cache", help="keep the generated JPEGs in this folder for reuse")
    args = parser.parse_args()
    hosts, rows = plan(args.images)
    ready: mp.Queue = mp.Queue()
    server = mp.Process(target=serve, args=(hosts, min(args.images, 500), ready, args.image_cache),
                        daemon=True)  # fmt: skip
    server.start()
    ports = ready.get(timeout=600)
    try:
        results = [measure(args, None, ports, hosts, rows)]
        if args.matched:
            results.append(measure(args, args.matched, ports, hosts, rows))
    finally:
        server.terminate()
    lead = f"{args.images:,} JPEGs from {len(hosts)} hosts (LAION-like mix) → 64 px"
    save_rows = [
        comparison(f"{lead}, {r['budget']}, median of {args.repeats}", "images/s",
                   r["sdflow_images_per_second"], "img2dataset", r["img2dataset_images_per_second"],
                   goal=2.0 if r["budget"] == "defaults" else None)
        for r in results
    ]  # fmt: skip
    save("download-mix", "download-mix", save_rows, {"hosts": len(hosts), "results": results})
    for r in results:
        print(f"  {r['budget']:<9} sdflow {r['sdflow_images_per_second']} images/s, img2dataset "
              f"{r['img2dataset_images_per_second']}, ratio {r['ratio']}")  # fmt: skip
        print(f"    runs: sdflow {[x['images_per_second'] for x in r['sdflow']]}, kept "
              f"{[x['kept'] for x in r['sdflow']]}; img2dataset "
              f"{[x['images_per_second'] for x in r['img2dataset']]}, kept "
              f"{[x['kept'] for x in r['img2dataset']]}")  # fmt: skip
    print(json.dumps(results))


if __name__ == "__main__":
    main()
