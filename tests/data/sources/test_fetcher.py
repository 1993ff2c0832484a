"""The HTTP fetcher (`sdflow.data.sources.fetcher`) against the loopback image server: every
redirect hop is judged again by the address policy."""

from __future__ import annotations

import asyncio

import pytest
from fixtures.image_server import JPEG

from sdflow.config import DownloadConfig
from sdflow.data.sources.fetcher import Fetcher


def test_redirect_hops_are_checked_again(http_server):
    """A redirect from an allowed address to a refused one is not followed."""
    settings = DownloadConfig(allow_private_network=False, timeout_s=2, retries=0)

    async def fetch(path: str) -> bytes:
        async with Fetcher(settings, policy=lambda ip: str(ip) == "127.0.0.1") as fetcher:
            return await fetcher.fetch(http_server.url(path))

    assert asyncio.run(fetch("/redirect")) == JPEG  # a hop to the same, allowed address
    with pytest.raises(Exception) as caught:
        asyncio.run(fetch("/redirect-out"))
    assert getattr(caught.value, "reason", None) == "refused_address"
    assert http_server.log == ["/redirect", "/good.jpg", "/redirect-out"]
