"""The whole-dataset pass of the filter stage: exact, near (pHash) and semantic (CLIP) duplicates.

It runs after the per-row checks, over the rows that passed them, in dataset order: a row is
rejected when a kept row has the same content hash (`duplicate`), a perceptual hash within
`filter.near_dup_distance` bits (`near_duplicate`) or an image embedding within cosine 1 - epsilon
(`semantic_duplicate`); otherwise it is kept and becomes a twin for the rows after it.
"""

from __future__ import annotations

from typing import Any

from sdflow.data.filters import Rejection
from sdflow.data.filters.phash import NearDuplicates
from sdflow.data.filters.semantic import SemanticDuplicates


class Deduplicator:
    """Exact duplicates by original content hash, then near-duplicates by perceptual hash when
    `near_distance` is set, then semantic duplicates when `semantic` is given; only kept samples
    count as seen."""

    def __init__(
        self,
        enabled: bool,
        near_distance: int | None = None,
        semantic: SemanticDuplicates | None = None,
    ):
        self.enabled = enabled
        self.seen: dict[str, str] = {}  # content_hash -> id of the kept sample
        self.near = NearDuplicates(near_distance) if near_distance is not None else None
        self.semantic = semantic

    def check(
        self, row: dict[str, Any], phash: str | None = None, embed: list[float] | None = None
    ) -> Rejection | None:
        twin = self.seen.get(row.get("content_hash") or "") if self.enabled else None
        if twin is not None:
            return Rejection("duplicate", twin)
        near = self.near.twin(phash) if self.near and phash else None
        if near is not None:
            return Rejection("near_duplicate", f"{near[0]} at Hamming distance {near[1]}")
        similar = self.semantic.twin(embed) if self.semantic and embed is not None else None
        if similar is not None:
            return Rejection("semantic_duplicate", f"{similar[0]} at cosine {similar[1]:.6f}")
        return None

    def add(
        self,
        content_hash: str | None,
        sample_id: str,
        phash: str | None = None,
        embed: list[float] | None = None,
    ) -> None:
        if self.enabled and content_hash:
            self.seen.setdefault(content_hash, sample_id)
        if self.near and phash:
            self.near.add(phash, sample_id)
        if self.semantic and embed is not None:
            self.semantic.add(embed, sample_id)
