"""An httpcore network stream whose "is the idle connection readable?" check costs one poll().

httpcore's connection pool asks every idle connection `get_extra_info("is_readable")` each time a
request starts or ends (a readable idle connection means the server closed it). anyio answers by
building the socket's whole attribute table, a `getpeername()` syscall included, before the poll;
on a download of small images that was about a tenth of the event loop's time. `PooledStream`
looks the raw socket up once and polls it directly; every other call goes to the wrapped stream.
"""

from __future__ import annotations

import socket
from typing import Any

import httpcore
from httpcore._utils import is_socket_readable  # httpcore's own check (poll, or select)


class PooledStream(httpcore.AsyncNetworkStream):
    """`inner` with a cheap `is_readable`; `start_tls` wraps the TLS stream the same way."""

    def __init__(self, inner: httpcore.AsyncNetworkStream):
        self.inner = inner
        self.socket: socket.socket | None = inner.get_extra_info("socket")

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self.inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self.inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def start_tls(
        self, ssl_context, server_hostname: str | None = None, timeout: float | None = None
    ) -> PooledStream:
        return PooledStream(await self.inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and self.socket is not None:
            return is_socket_readable(self.socket)
        return self.inner.get_extra_info(info)
