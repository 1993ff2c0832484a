"""Near-duplicates by perceptual hash, across the whole dataset.

Each row that passes the per-row checks gets a 64-bit pHash (`imagehash.phash`), recorded with its
verdict so a later build does not decode it again. Then, in dataset order, a row whose hash differs
in at most `filter.near_dup_distance` bits from an already kept row's is rejected as
`near_duplicate` (detail: the kept twin's id and the distance); otherwise it is kept and joins the
index. So one row per cluster survives, the first in dataset order, and every rejected row has a
kept twin within the distance (clusters do not chain through rejected rows).

Candidates come from a multi-index: the hash is cut into distance + 1 bands, and two hashes within
the distance agree on at least one whole band (pigeonhole), so only rows sharing a band with the
query are compared.
"""

from __future__ import annotations

import io

HASH_BITS = 64


def phash_hex(data: bytes) -> str:
    """The image's 64-bit perceptual hash as 16 hex digits."""
    import imagehash
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return str(imagehash.phash(image))


class NearDuplicates:
    """The kept rows' hashes, indexed by band; `check` finds a kept twin, `add` keeps a row."""

    def __init__(self, distance: int):
        self.distance = distance
        bands = distance + 1
        edges = [round(i * HASH_BITS / bands) for i in range(bands + 1)]
        self.bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:], strict=False)]
        self.index: list[dict[int, list[int]]] = [{} for _ in self.bands]
        self.kept: list[tuple[int, str]] = []  # (hash, id) in dataset order

    def twin(self, phash: str) -> tuple[str, int] | None:
        """The nearest kept row within the distance (earliest on a tie) and its distance."""
        value = int(phash, 16)
        best: tuple[int, int] | None = None  # (distance, position)
        for band, (shift, mask) in zip(self.index, self.bands, strict=True):
            for position in band.get((value >> shift) & mask, ()):
                found = (value ^ self.kept[position][0]).bit_count(), position
                if found[0] <= self.distance and (best is None or found < best):
                    best = found
        return None if best is None else (self.kept[best[1]][1], best[0])

    def add(self, phash: str, sample_id: str) -> None:
        value = int(phash, 16)
        position = len(self.kept)
        self.kept.append((value, sample_id))
        for band, (shift, mask) in zip(self.index, self.bands, strict=True):
            band.setdefault((value >> shift) & mask, []).append(position)
