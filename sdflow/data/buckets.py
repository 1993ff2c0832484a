"""Aspect-ratio buckets: the shapes images are cropped to in the latents stage, and which one each
image gets.

A bucket set is `latents.buckets`: `none` (one square bucket at `download.resolution`, today's
centre crops), a grid generated from a target `resolution` (every width x height with sides in
`step`s between `min_side` and `max_side` and an area of at most `resolution`**2, largest height
per width, in both orientations), or an explicit list of [width, height]. An image goes to the
bucket whose aspect ratio is nearest its own in log ratio (so 2:1 and 1:2 are equally far from
1:1); ties go to the larger area, then the smaller width, so the assignment never depends on the
order the set is written in. The image is then resized to cover the bucket and centre-cropped
(`sdflow.data.imaging.cover_crop`).

`step` defaults to 64 px: the latent granularity of every Stable Diffusion (the VAE downsamples 8x
and the UNet's three downsampling blocks 8x more), the step kohya's and SimpleTuner's bucketers
use; a small model (the tiny test profiles) sets a smaller step.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdflow.config import BucketGrid, LatentsConfig
from sdflow.data.imaging import cover_crop

Bucket = tuple[int, int]  # (width, height) in pixels


def bucket_set(latents: LatentsConfig, resolution: int) -> list[Bucket]:
    """The configured buckets, sorted by aspect ratio (width / height), then width."""
    spec = latents.buckets
    if spec == "none":
        buckets = {(resolution, resolution)}
    elif isinstance(spec, BucketGrid):
        buckets = grid_buckets(spec)
    else:
        buckets = {(int(w), int(h)) for w, h in spec}
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def grid_buckets(grid: BucketGrid) -> set[Bucket]:
    """For each side `s` in steps: the longest other side (a multiple of `step`, within bounds)
    that keeps the area at most `resolution`**2; both orientations."""
    area = grid.resolution**2
    lo, hi, step = grid.min_side_or_default, grid.max_side_or_default, grid.step
    buckets: set[Bucket] = set()
    for short in range(lo, hi + 1, step):
        long = min(hi, area // short // step * step)
        if long >= short:
            buckets |= {(long, short), (short, long)}
    return buckets


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket nearest in log aspect ratio; ties: larger area, then smaller width."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1], b[0]))


def bucket_name(bucket: Bucket) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def bucket_pixels(data: bytes, bucket: Bucket) -> tuple[Tensor, tuple[int, int]]:
    """Encoded image bytes -> ([3, height, width] in [-1, 1], crop (top, left)): resized to cover
    the bucket and centre-cropped to it."""
    with Image.open(io.BytesIO(data)) as image:
        cropped, top_left = cover_crop(image.convert("RGB"), *bucket)
        array = np.asarray(cropped, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() / 127.5 - 1.0, top_left
