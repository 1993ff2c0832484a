"""Semantic duplicates (`sdflow.data.filters.semantic`): greedy first-kept against a brute-force
reference, the index against a full scan."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures.filtering import (
    CLIP_ROWS,
    CLIP_SHARDS,
    crash_on_second_shard,
    curation_config,
    encoded,
    fates,
    image_embeds,
    picture,
    sample,
    variant,
)
from fixtures.stages import write_stage

from sdflow.data.filters.semantic import SemanticDuplicates, fit_centroids
from sdflow.store.stageio import read_failures
from tasks.filter import filter_samples


def greedy(ids: list[str], embeds: np.ndarray, bound: float) -> dict[str, tuple[str, float]]:
    """Reference: in order, each row against every kept row; rejected id -> (twin, cosine)."""
    kept: list[int] = []
    rejected = {}
    for row in range(len(ids)):
        cosines = [(float(embeds[row] @ embeds[k]), -k) for k in kept]
        best = max(cosines, default=(-2.0, 0))
        if best[0] >= bound:
            rejected[ids[row]] = (ids[-best[1]], best[0])
        else:
            kept.append(row)
    return rejected


@pytest.mark.parametrize("resumed", [False, True])
def test_semantic_duplicates_keep_the_first(
    tmp_path: Path,
    clip_dir: Path,
    resumed: bool,
    monkeypatch: pytest.MonkeyPatch,
    one_torch_thread,
) -> None:
    extra = {"k0v": variant(picture(200)), "k3v": variant(picture(203))}
    shards = [
        *CLIP_SHARDS,
        [sample(s, (i, 4, 4), data=encoded(im)) for i, (s, im) in enumerate(extra.items())],
    ]
    ids = [row["id"] for shard in shards for row in shard]
    images = {**{s: im for s, (im, _) in CLIP_ROWS.items()}, **extra}
    expected = greedy(ids, image_embeds(clip_dir, [images[s] for s in ids]), 0.99)
    assert {s: t for s, (t, _) in expected.items()} == {"k0v": "k0", "k3v": "k3"}
    config = curation_config(clip_model=str(clip_dir), semantic_dedup={"epsilon": 0.01})
    up = {"download": write_stage(tmp_path, "download", shards)}
    if resumed:  # shard 0 (with k0, k3) was finished before a crash: its embeddings come back
        crash_on_second_shard(monkeypatch)
        with pytest.raises(RuntimeError, match="killed"):
            filter_samples(config, up, str(tmp_path))
    manifest = filter_samples(config, up, str(tmp_path))
    assert fates(tmp_path, manifest) == {
        s: "semantic_duplicate" if s in expected else "kept" for s in ids
    }
    for failure in read_failures(tmp_path, manifest).to_pylist():
        shown = re.fullmatch(r"(\S+) at cosine ([0-9.]+)", failure["detail"])
        twin, cosine = expected[failure["id"]]
        assert shown and shown[1] == twin and float(shown[2]) == pytest.approx(cosine, abs=1e-5)
    assert manifest["info"]["semantic_clusters"] == 1


@pytest.mark.parametrize("rows_per_cluster", [10_000, 25])
def test_semantic_index_against_a_full_scan(tmp_path: Path, rows_per_cluster: int) -> None:
    rng = np.random.default_rng(rows_per_cluster)
    base = rng.normal(size=(200, 16))
    copies = base[rng.integers(0, 200, 100)] + rng.normal(scale=0.01, size=(100, 16))
    vectors = np.concatenate([base, copies])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"r{i}" for i in range(len(vectors))]
    path = tmp_path / "clip.parquet"
    pq.write_table(pa.table({"image_embed": vectors.astype(np.float32).tolist()}), path)
    centroids = fit_centroids([path], len(vectors), rows_per_cluster)
    assert len(centroids) == max(1, len(vectors) // rows_per_cluster)
    index, got = SemanticDuplicates(0.02, centroids), {}
    for sample_id, vector in zip(ids, vectors.astype(np.float32).tolist(), strict=True):
        twin = index.twin(vector)
        if twin is None:
            index.add(vector, sample_id)
        else:
            got[sample_id] = twin[0]
    expected = {s: t for s, (t, _) in greedy(ids, vectors, 0.98).items()}
    assert len(expected) >= 100  # every planted copy
    if len(centroids) == 1:
        assert got == expected
    else:  # clusters: a copy is compared within its original's cluster, as SemDeDup does
        assert len(set(got.items()) & set(expected.items())) >= 0.95 * len(expected)
        assert set(got) <= set(expected)
