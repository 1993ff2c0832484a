"""Images, a tiny BLIP-2 and a network ban (tiny BLIP, open_clip and term lists: tests/conftest.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdflow.data.captioners.random_init import save_random_blip2


@pytest.fixture(scope="session")
def color_images() -> list[Image.Image]:
    """Six 32 px images: noise, so that a random model sees different inputs."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (6, 32, 32, 3), generator=generator, dtype=torch.uint8)
    return [Image.fromarray(p.numpy()) for p in pixels]


@pytest.fixture(scope="session")
def tiny_blip2(tmp_path_factory: pytest.TempPathFactory, caption_words: list[str]) -> Path:
    return save_random_blip2(tmp_path_factory.mktemp("captioners") / "blip2", caption_words)


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
