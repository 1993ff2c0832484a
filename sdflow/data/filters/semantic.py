"""Semantic deduplication on the CLIP image embeddings, SemDeDup-style.

`filter.semantic_dedup: {epsilon: 0.05}` (with `filter.clip_model`): in dataset order, a row whose
normalised image embedding has cosine >= 1 - epsilon with an already kept row's is rejected as
`semantic_duplicate` (detail: the kept twin's id and the cosine); otherwise it is kept. The first
in dataset order survives, and every rejected row has a kept twin above the bound.

So that this scales, the embeddings are first clustered with spherical k-means (about
ROWS_PER_CLUSTER rows per cluster, fitted on at most SAMPLE rows spread over the dataset), and a row
is compared only with the kept rows of its own cluster; like SemDeDup, a pair split across two
clusters is missed. With fewer than 2 x ROWS_PER_CLUSTER rows there is one cluster: exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from sdflow.store.stageio import shard_paths

if TYPE_CHECKING:
    from sdflow.config import FilterConfig

ROWS_PER_CLUSTER = 1000
SAMPLE = 100_000
ITERATIONS = 10
DECIMALS = 6


def semantic_index(
    cfg: FilterConfig, clip: dict[str, Any] | None, workdir: str | Path
) -> SemanticDuplicates | None:
    """The empty index of kept embeddings, its clusters fitted on the CLIP output `clip`."""
    if cfg.semantic_dedup is None or clip is None:
        return None
    centroids = fit_centroids(shard_paths(workdir, clip), clip["counts"]["input"])
    return SemanticDuplicates(cfg.semantic_dedup.epsilon, centroids)


def fit_centroids(
    shards: list[Path], total: int, rows_per_cluster: int = ROWS_PER_CLUSTER
) -> np.ndarray:
    """Spherical k-means centroids of the image embeddings in the CLIP `shards`."""
    stride = max(1, -(-total // SAMPLE))
    picked, seen = [], 0
    for shard in shards:
        for vector in pq.read_table(shard, columns=["image_embed"]).column(0).to_pylist():
            if vector is not None and seen % stride == 0:
                picked.append(vector)
            seen += vector is not None
    if not picked:
        return np.zeros((0, 0))
    vectors = np.asarray(picked, dtype=np.float64)
    return spherical_kmeans(vectors, max(1, len(vectors) * stride // rows_per_cluster))


def spherical_kmeans(vectors: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k unit centroids (k-means on the sphere: assign by cosine, centroid = normalised mean)."""
    rng = np.random.default_rng(seed)
    centroids = vectors[rng.choice(len(vectors), size=min(k, len(vectors)), replace=False)].copy()
    for _ in range(ITERATIONS):
        labels = (vectors @ centroids.T).argmax(axis=1)
        for j in range(len(centroids)):
            total = vectors[labels == j].sum(axis=0)
            norm = np.linalg.norm(total)
            if norm > 0:
                centroids[j] = total / norm
    return centroids


class SemanticDuplicates:
    """The kept rows' embeddings per cluster; `twin` finds a kept twin, `add` keeps a row."""

    def __init__(self, epsilon: float, centroids: np.ndarray):
        self.bound = 1.0 - epsilon
        self.centroids = centroids
        self.members: dict[int, _Rows] = {}

    def _cluster(self, vector: np.ndarray) -> int:
        return int((self.centroids @ vector).argmax()) if len(self.centroids) else 0

    def twin(self, embed: list[float]) -> tuple[str, float] | None:
        """The most similar kept row of the cluster (earliest on a tie), if within the bound."""
        vector = np.asarray(embed, dtype=np.float64)
        rows = self.members.get(self._cluster(vector))
        if rows is None:
            return None
        cosines = np.round(rows.matrix[: len(rows.ids)] @ vector, DECIMALS)
        best = int(cosines.argmax())
        return (rows.ids[best], float(cosines[best])) if cosines[best] >= self.bound else None

    def add(self, embed: list[float], sample_id: str) -> None:
        vector = np.asarray(embed, dtype=np.float64)
        cluster = self._cluster(vector)
        if cluster not in self.members:
            self.members[cluster] = _Rows(len(vector))
        self.members[cluster].append(vector, sample_id)


class _Rows:
    """A cluster's kept ids and embeddings (a matrix that doubles as it fills)."""

    def __init__(self, dim: int):
        self.ids: list[str] = []
        self.matrix = np.empty((16, dim))

    def append(self, vector: np.ndarray, sample_id: str) -> None:
        if len(self.ids) == len(self.matrix):
            self.matrix = np.concatenate([self.matrix, np.empty_like(self.matrix)])
        self.matrix[len(self.ids)] = vector
        self.ids.append(sample_id)
