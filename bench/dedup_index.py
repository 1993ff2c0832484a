"""Throughput of the filter stage's duplicate indexes on synthetic data (one CPU core).

    python bench/dedup_index.py [--hashes 100000] [--distances 4,8] [--embeddings 20000] [--dim 512]

Random 64-bit hashes go through the pHash multi-index (`sdflow.data.filters.phash.NearDuplicates`) at
each Hamming distance, and random unit vectors through spherical k-means and the semantic index
(`sdflow.data.filters.semantic`), in dataset order, as the filter stage feeds them; prints seconds.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from sdflow.data.filters.phash import NearDuplicates
from sdflow.data.filters.semantic import ROWS_PER_CLUSTER, SemanticDuplicates, spherical_kmeans


def bench_phash(count: int, distance: int) -> float:
    rng = random.Random(0)
    hashes = [f"{rng.getrandbits(64):016x}" for _ in range(count)]
    start, index = time.perf_counter(), NearDuplicates(distance)
    for row, value in enumerate(hashes):
        if index.twin(value) is None:
            index.add(value, str(row))
    return time.perf_counter() - start


def bench_semantic(count: int, dim: int) -> tuple[float, float]:
    vectors = np.random.default_rng(0).normal(size=(count, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    start = time.perf_counter()
    centroids = spherical_kmeans(vectors, max(1, count // ROWS_PER_CLUSTER))
    fitted, index = time.perf_counter(), SemanticDuplicates(0.05, centroids)
    for row, vector in enumerate(vectors.astype(np.float32).tolist()):
        if index.twin(vector) is None:
            index.add(vector, str(row))
    return fitted - start, time.perf_counter() - fitted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hashes", type=int, default=100_000)
    parser.add_argument("--distances", default="4,8")
    parser.add_argument("--embeddings", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    for distance in map(int, args.distances.split(",")):
        seconds = bench_phash(args.hashes, distance)
        print(f"pHash index, {args.hashes} rows, distance {distance}: {seconds:.1f} s")
    fit, scan = bench_semantic(args.embeddings, args.dim)
    print(f"semantic index, {args.embeddings} x {args.dim}: k-means {fit:.1f} s, pass {scan:.1f} s")


if __name__ == "__main__":
    main()
