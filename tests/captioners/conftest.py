"""Tiny random caption models saved like pretrained ones, images, term lists, a network ban."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdflow.captioners.random_init import (
    save_random_blip,
    save_random_blip2,
    save_random_open_clip,
    tiny_blip_config,
)

WORDS = ["a", "photograph", "of", "zebra", "quartz", "violet", "ember", "lagoon", "maple"]
TERMS = {
    "artists.txt": ["Claude Monet", "Pablo Picasso", "Hokusai"],
    "flavors.txt": ["sharp focus", "highly detailed", "soft light", "blurry", "4k", "grainy"],
    "mediums.txt": ["oil painting", "charcoal drawing", "watercolor"],
    "movements.txt": ["impressionism", "cubism", "ukiyo-e"],
    "negative.txt": ["ugly", "text", "watermark"],
}
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def caption_words() -> list[str]:
    """The tiny caption models' whole vocabulary (special tokens aside)."""
    return WORDS


@pytest.fixture(scope="session")
def color_images() -> list[Image.Image]:
    """Six 32 px images: noise, so that a random model sees different inputs."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (6, 32, 32, 3), generator=generator, dtype=torch.uint8)
    return [Image.fromarray(p.numpy()) for p in pixels]


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random BLIP whose captions are words of WORDS (special tokens banned: never empty)."""
    out = tmp_path_factory.mktemp("captioners") / "blip"
    return save_random_blip(out, tiny_blip_config(len(WORDS) + 6), WORDS)


@pytest.fixture(scope="session")
def tiny_blip2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_blip2(tmp_path_factory.mktemp("captioners") / "blip2", WORDS)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random open_clip model (ViT, 32 px) as a local directory. Its short text context (24
    tokens) ends clip-interrogator's term chains early: they grow until the prompt fills it."""
    return save_random_open_clip(tmp_path_factory.mktemp("captioners") / "clip", TINY_CLIP)


@pytest.fixture(scope="session")
def term_lists(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("terms")
    for name, terms in TERMS.items():
        (out / name).write_text("\n".join(terms) + "\n")
    return out


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every attempt to open a connection raises, and is recorded: a test asserts the record is
    empty, so an attempt that a library caught and swallowed still fails it."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts
