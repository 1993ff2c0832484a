"""Per-host gates: the connection cap holds across shards, a small or refusing host is fetched at its
own pace, and the limit adapts as described in `sdflow.data.sources.hostgate`."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from sdflow.config import DownloadConfig
from sdflow.data.imaging import Rejected
from sdflow.data.sources import hostgate
from sdflow.data.sources.fetcher import Fetcher
from sdflow.data.sources.hostgate import GIVE_UP, PROBE, HostDown, HostGate, HostGates

BODY = b"\x89PNG fake image body " * 50


class CountingServer:
    """HTTP/1.0 on 127.0.0.1: listen(`backlog`), one accept per `accept_every` seconds, each
    connection answered after `hold` seconds in a thread; records the most requests accepted and
    not yet answered at once."""

    def __init__(self, backlog: int = 128, accept_every: float = 0.0, hold: float = 0.0, port=0):
        self.accept_every, self.hold = accept_every, hold
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.open = self.most_open = self.served = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.open += 1
                self.most_open = max(self.most_open, self.open)
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()
            time.sleep(self.accept_every)

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                request += chunk
            time.sleep(self.hold)
            with self.lock:  # before the answer: the client may start its next request once it
                self.open -= 1  # has the body, maybe before this thread runs again
                self.served += 1
            head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(BODY)}\r\nConnection: close\r\n\r\n"
            conn.sendall(head.encode() + BODY)

    def close(self) -> None:
        self.sock.close()

    def urls(self, count: int) -> list[str]:
        return [f"http://127.0.0.1:{self.port}/{i}.png" for i in range(count)]


def settings(**changes) -> DownloadConfig:
    base = {"allow_private_network": True, "timeout_s": 5, "backoff_s": 0.1, "concurrency": 64}
    return DownloadConfig(**{**base, **changes})


async def fetch_all(config: DownloadConfig, urls: list[str], gates: HostGates) -> list:
    async with Fetcher(config, gates=gates) as fetcher:
        return await asyncio.gather(*(fetcher.fetch(u) for u in urls), return_exceptions=True)


def test_cap_holds_across_shards_of_one_process():
    """Two shards (threads, each its own event loop) share the host's limit (starting at 4; the
    fast host lets it grow, but the two shards together never exceed it)."""
    server = CountingServer(hold=0.05)
    gates = HostGates(4, 0.1)
    config = settings(per_host_connections=4)
    results: list = []

    def shard(urls: list[str]) -> None:
        results.extend(asyncio.run(fetch_all(config, urls, gates)))

    urls = server.urls(40)
    threads = [threading.Thread(target=shard, args=(part,)) for part in (urls[:20], urls[20:])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    server.close()
    assert results == [BODY] * 40
    gate = gates.gate("127.0.0.1", server.port)
    assert 2 <= server.most_open <= gate.peak < 40  # 64 per shard were allowed without the gate


def test_small_backlog_host_completes_and_its_limit_shrinks():
    """listen(1) and a slow acceptor: a burst of connects overflows the backlog (dropped SYNs, or
    refusals); the gate shrinks the host's limit and every row still arrives."""
    server = CountingServer(backlog=1, accept_every=0.01)
    gates = HostGates(16, 0.1)
    results = asyncio.run(fetch_all(settings(per_host_connections=16), server.urls(48), gates))
    server.close()
    assert results == [BODY] * 48
    assert server.most_open <= 16
    assert gates.gate("127.0.0.1", server.port).shrinks >= 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_refused_connects_wait_for_the_host_then_succeed():
    """Nothing listens at first: the rows wait out the host's pause and retry once it is up."""
    port = _free_port()
    started: list[CountingServer] = []
    timer = threading.Timer(0.15, lambda: started.append(CountingServer(port=port)))
    timer.start()
    urls = [f"http://127.0.0.1:{port}/{i}.png" for i in range(6)]
    results = asyncio.run(fetch_all(settings(connect_retries=3), urls, HostGates(16, 0.2)))
    timer.join()
    started[0].close()
    assert results == [BODY] * 6


def test_without_connect_retries_a_refused_row_fails_as_connection_error():
    urls = [f"http://127.0.0.1:{_free_port()}/x.png"]
    (result,) = asyncio.run(fetch_all(settings(connect_retries=0), urls, HostGates(16, 0.2)))
    assert isinstance(result, Rejected) and result.reason == "connection_error"


def test_limit_halves_on_stalls_settles_below_them_and_recovers_slowly(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(hostgate.time, "monotonic", lambda: clock[0])
    gate = HostGate(16, 0.01)
    gate.connected(2.0)  # a retransmitted SYN at 16: limit 8, ceiling 16 - 16 // 4 = 12
    gate.connected(1.5)  # same burst (started before the halving): no second halving
    assert (gate.limit, gate.ceiling) == (8, 12)
    clock[0] += 5
    gate.connected(2.0)  # a new stall, at 8: limit 4, ceiling 8 - 8 // 4 = 6
    assert (gate.limit, gate.ceiling) == (4, 6)
    for _ in range(4):  # one window of clean connects at limit 4
        gate.connected(0.001)
    assert gate.limit == 5
    for _ in range(20):  # 5 more reach 6; the ceiling holds it there
        gate.connected(0.001)
    assert gate.limit == 6
    for _ in range(PROBE * 6 - 24):  # the ceiling's probe: PROBE x 6 clean connects since the stall
        gate.connected(0.001)
    assert gate.ceiling == 7
    for _ in range(5000):
        gate.connected(0.001)
    assert gate.limit == gate.ceiling == 16  # back at the cap, never above it


def test_a_host_failing_round_after_round_is_given_up_others_go_on():
    gates = HostGates(16, 0.001)
    down = gates.gate("down.example", 80)
    for _ in range(GIVE_UP):
        down.connect_failed()
        down.connect_failed()  # same round: started before the pause
        time.sleep(0.02)  # past the pause (at most 8 ms here)
    assert down.limit == 1  # 16 halved once per round: 8, 4, 2, 1

    async def acquire(gate: HostGate) -> None:
        await gate.acquire()
        gate.release()

    with pytest.raises(HostDown):
        asyncio.run(acquire(down))
    asyncio.run(acquire(gates.gate("up.example", 80)))  # another host is untouched


def test_a_waiter_on_the_releasing_loop_is_woken_without_a_cross_thread_call():
    """Same loop: resolved in place (no self-pipe write); another thread's loop: call_soon_threadsafe."""
    gate = HostGate(1, 0.01)
    cross: list[object] = []

    async def same_loop() -> list[str]:
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (cross.append(a), real(*a))[1]  # type: ignore
        order: list[str] = []

        async def row(name: str) -> None:
            await gate.acquire()
            order.append(name)
            await asyncio.sleep(0)
            gate.release()

        await asyncio.gather(row("a"), row("b"), row("c"))
        return order

    assert asyncio.run(same_loop()) == ["a", "b", "c"]
    assert cross == [] and gate.active == 0

    async def hold_then_release_elsewhere() -> None:
        await gate.acquire()
        releaser = threading.Thread(target=lambda: (time.sleep(0.05), gate.release()))
        releaser.start()
        await asyncio.wait_for(gate.acquire(), 5)  # woken from the other thread
        gate.release()
        releaser.join()

    asyncio.run(hold_then_release_elsewhere())
    assert gate.active == 0
