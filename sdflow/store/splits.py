"""The held-out split: decided by each sample's id alone, so every stage agrees without a shared list."""

from __future__ import annotations

import hashlib


def is_held_out(sample_id: str, fraction: float) -> bool:
    """True for about `fraction` of ids, the same ones in every stage and every run."""
    if fraction <= 0:
        return False
    bucket = int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big") / 2**64
    return bucket < fraction
