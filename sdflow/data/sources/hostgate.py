"""Per-host politeness that is also speed: a connection cap per host, shrunk when the host struggles.

A URL list often sends thousands of rows to one host. Opening all of them at once overflows a small
server's listen backlog; the dropped SYNs then wait for TCP's retransmit timers (1 s, 3 s, 7 s ...),
and a download that should take seconds takes minutes. `HostGate` lets at most `limit` requests to a
host be in flight in this process (every shard's event loop shares it), with `limit` starting at
`download.per_host_connections` and adapting like TCP's congestion window:

- a connect that fails (refused, reset, timed out) halves the limit and pauses the host for a back-off
  that doubles with each such round (failures during a pause belong to its round; at most
  MAX_PAUSE_S); the row waits and tries again;
- a connect that succeeds but takes longer than STALL_S (a SYN was dropped and retransmitted) halves
  the limit too, without a pause, unless it started before the last halving (one burst of dropped
  SYNs is one signal, like one round of failures);
- every `limit` requests that connect cleanly raise the limit by one, up to a ceiling: each halving
  sets the ceiling to 3/4 of the limit that struggled, so the limit settles just below what the host
  takes instead of overflowing it again and again; every PROBE x ceiling clean connects raise the
  ceiling by one (a host that recovers gets its connections back), never above the cap.

After GIVE_UP rounds of failed connects with no success between them (about 7 s of back-off at the
default `download.backoff_s`), the host counts as down for DOWN_S: its rows fail at once
(`connection_error`) instead of each waiting out the back-off. Other hosts go on untouched. The
gates are shared by thread-safe bookkeeping; each waiter is woken on its own event loop (directly
when that is the releasing thread's loop: a cross-thread wake-up costs a self-pipe write and read). A
redirect's hops count against the first host's slot; their connects teach their own hosts' gates.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque

STALL_S = 0.9  # Linux retransmits a dropped SYN after 1 s: a connect this slow lost one
MAX_PAUSE_S = 8.0
GIVE_UP = 4
PROBE = 8
DOWN_S = 60.0


class HostDown(Exception):
    """The host failed GIVE_UP rounds of connects in a row; its rows are not tried for a while."""


class HostGate:
    """At most `limit` requests in flight to one host; `limit` adapts between 1 and `cap`."""

    def __init__(self, cap: int, backoff_s: float):
        self.cap, self.limit, self.ceiling, self.backoff_s = cap, cap, cap, backoff_s
        self.active = 0  # requests in flight
        self.clean = 0  # clean connects since the limit last changed
        self.probe = 0  # clean connects since the ceiling last changed
        self.rounds = 0  # back-off rounds of failed connects, in a row
        self.shrinks = 0  # how often the limit was halved (reported by the stage)
        self.resume_at = 0.0  # monotonic time before which nothing starts
        self.shrunk_at = float("-inf")  # monotonic time of the last halving
        self.down_until = 0.0
        self.lock = threading.Lock()
        self.waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = deque()

    async def acquire(self) -> None:
        """Wait for a slot (and for the end of any pause); raises HostDown while the host is down."""
        loop = asyncio.get_running_loop()
        while True:
            with self.lock:
                now = time.monotonic()
                if now < self.down_until:
                    raise HostDown(f"{GIVE_UP} rounds of connects in a row failed")
                pause = self.resume_at - now
                if pause <= 0 and self.active < self.limit:
                    self.active += 1
                    return
                future = loop.create_future()
                if pause <= 0:
                    self.waiters.append((loop, future))
            if pause > 0:
                await asyncio.sleep(pause)
                continue
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._wake()  # hand the wake-up on, or a free slot would sit unused
                raise

    def release(self) -> None:
        with self.lock:
            self.active -= 1
        self._wake()

    def connected(self, seconds: float) -> None:
        """A connect succeeded after `seconds`."""
        with self.lock:
            self.rounds = 0
            if seconds > STALL_S:
                now = time.monotonic()
                if now - seconds >= self.shrunk_at:  # started after the last halving
                    self._shrink()
                return
            self.clean += 1
            self.probe += 1
            if self.probe >= PROBE * self.ceiling and self.ceiling < self.cap:
                self.ceiling, self.probe = self.ceiling + 1, 0
            grew = self.clean >= self.limit and self.limit < self.ceiling
            if grew:
                self.limit, self.clean = self.limit + 1, 0
        if grew:
            self._wake()

    def connect_failed(self) -> None:
        """A connect was refused, reset or timed out: shrink, pause, maybe give the host up."""
        with self.lock:
            now = time.monotonic()
            if now < self.resume_at:
                return  # started before this pause: the round is already counted
            self._shrink()
            self.rounds += 1
            self.resume_at = now + min(MAX_PAUSE_S, self.backoff_s * 2 ** (self.rounds - 1))
            if self.rounds >= GIVE_UP:
                self.down_until, self.rounds = now + DOWN_S, 0

    def _shrink(self) -> None:
        self.ceiling = max(1, self.limit - max(1, self.limit // 4))
        self.limit, self.clean, self.probe = max(1, self.limit // 2), 0, 0
        self.shrinks += 1
        self.shrunk_at = time.monotonic()

    def _wake(self) -> None:
        """Wake as many waiters as there are free slots (each re-checks under the lock)."""
        with self.lock:
            free = self.limit - self.active
            woken = [self.waiters.popleft() for _ in range(min(free, len(self.waiters)))]
        here = _running_loop()
        for loop, future in woken:
            if loop is here:  # a waiter on this thread's loop: no self-pipe write, no wake-up
                _resolve(future)
            else:
                loop.call_soon_threadsafe(_resolve, future)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class HostGates:
    """The gate of each host (`host:port`), created on first use; thread-safe."""

    def __init__(self, cap: int, backoff_s: float):
        self.cap, self.backoff_s = cap, backoff_s
        self.gates: dict[str, HostGate] = {}
        self.lock = threading.Lock()

    def gate(self, host: str, port: int) -> HostGate:
        key = f"{host.lower()}:{port}"
        with self.lock:
            if key not in self.gates:
                self.gates[key] = HostGate(self.cap, self.backoff_s)
            return self.gates[key]


_SHARED: dict[tuple[int, float], HostGates] = {}
_SHARED_LOCK = threading.Lock()


def shared_gates(cap: int, backoff_s: float) -> HostGates:
    """The process-wide gates for these settings: every shard of a download shares them."""
    with _SHARED_LOCK:
        return _SHARED.setdefault((cap, backoff_s), HostGates(cap, backoff_s))
