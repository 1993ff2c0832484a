"""The downloader's connections answer httpcore's idle-readability check with one poll()."""

from __future__ import annotations

import asyncio
import socket

from sdflow.netguard import GuardedBackend
from sdflow.pooledstream import PooledStream


def test_readability_is_polled_on_the_socket_and_other_queries_pass_through():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    async def main() -> None:
        stream = await GuardedBackend(policy=None).connect_tcp("127.0.0.1", port)
        assert isinstance(stream, PooledStream)
        server_side, _ = listener.accept()
        asked: list[str] = []
        inner = stream.inner.get_extra_info
        stream.inner.get_extra_info = lambda info: (asked.append(info), inner(info))[1]
        assert stream.get_extra_info("is_readable") is False  # idle, nothing sent
        server_side.sendall(b"HTTP/1.1 200 OK\r\n")  # the server speaks or closes: readable
        for _ in range(100):
            if stream.get_extra_info("is_readable"):
                break
            await asyncio.sleep(0.01)
        assert stream.get_extra_info("is_readable") is True
        assert asked == []  # never through anyio's attribute table
        assert stream.get_extra_info("server_addr") == ("127.0.0.1", port)
        assert asked == ["server_addr"]
        await stream.write(b"GET / HTTP/1.1\r\n\r\n")
        assert server_side.recv(64) == b"GET / HTTP/1.1\r\n\r\n"
        assert await stream.read(64) == b"HTTP/1.1 200 OK\r\n"
        await stream.aclose()
        server_side.close()

    asyncio.run(main())
    listener.close()
