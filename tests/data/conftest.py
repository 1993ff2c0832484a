"""Fixtures for the source and imaging tests: tiny real images, encoded as the tests need them, and
WebDataset tar shards built with `tarfile`."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fixtures.shards import Sample, write_tar
from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def gradient(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    """A smooth RGB image (compresses well, survives JPEG), different per seed."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [(x * 5 + seed * 40) % 256, (y * 6) % 256, np.full_like(x, (seed * 70) % 256)], axis=-1
    )
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


@pytest.fixture
def make_image() -> Callable[..., bytes]:
    """make_image(width, height, fmt="PNG", seed=0, **save_options) -> encoded bytes."""

    def make(width: int = 48, height: int = 40, fmt: str = "PNG", seed: int = 0, **options):
        return encode(gradient(width, height, seed), fmt, **options)

    return make


@pytest.fixture
def bomb_png() -> bytes:
    """A PNG header claiming 100000 x 100000 pixels: Pillow must refuse it before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def make_shard() -> Callable[[Path, list[Sample]], Path]:
    """make_shard(path, [(key, {"jpg": bytes, "txt": str, "json": dict}), ...]) -> path."""
    return write_tar
