"""Near-duplicates by perceptual hash, across the whole dataset.

Each row that passes the per-row checks gets a 64-bit pHash (`imagehash.phash`), recorded with its
verdict so a later build does not decode it again. Then, in dataset order, a row whose hash differs
in at most `filter.near_dup_distance` bits from an already kept row's is rejected as
`near_duplicate` (detail: the kept twin's id and the distance); otherwise it is kept and joins the
index. So one row per cluster survives, the first in dataset order, and every rejected row has a
kept twin within the distance (clusters do not chain through rejected rows).

Candidates come from a multi-index (Norouzi et al.'s multi-index hashing): the hash is cut into
four 16-bit bands, and two hashes within the distance d differ in at most d // 4 bits of at least
one band (pigeonhole), so each band's table is probed at every value within d // 4 bits of the
query's band, and only the rows found there are compared.
"""

from __future__ import annotations

import io

HASH_BITS = 64
BANDS = 4
BAND_BITS = HASH_BITS // BANDS


def phash_hex(data: bytes) -> str:
    """The image's 64-bit perceptual hash as 16 hex digits."""
    import imagehash
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return str(imagehash.phash(image))


class NearDuplicates:
    """The kept rows' hashes, indexed by band; `twin` finds a kept twin, `add` keeps a row."""

    def __init__(self, distance: int):
        self.distance = distance
        radius = distance // BANDS
        self.flips = [m for m in range(1 << BAND_BITS) if m.bit_count() <= radius]
        self.index: list[dict[int, list[int]]] = [{} for _ in range(BANDS)]
        self.kept: list[tuple[int, str]] = []  # (hash, id) in dataset order

    def twin(self, phash: str) -> tuple[str, int] | None:
        """The nearest kept row within the distance (earliest on a tie) and its distance."""
        value = int(phash, 16)
        candidates: set[int] = set()
        for band, key in zip(self.index, _bands(value), strict=True):
            for flip in self.flips:
                candidates.update(band.get(key ^ flip, ()))
        found = [((value ^ self.kept[p][0]).bit_count(), p) for p in candidates]
        best = min((f for f in found if f[0] <= self.distance), default=None)
        return None if best is None else (self.kept[best[1]][1], best[0])

    def add(self, phash: str, sample_id: str) -> None:
        value = int(phash, 16)
        position = len(self.kept)
        self.kept.append((value, sample_id))
        for band, key in zip(self.index, _bands(value), strict=True):
            band.setdefault(key, []).append(position)


def _bands(value: int) -> list[int]:
    return [(value >> (BAND_BITS * i)) & ((1 << BAND_BITS) - 1) for i in range(BANDS)]
