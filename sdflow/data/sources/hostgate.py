"""Per-host politeness that is also speed: a connection limit per host that learns what the host takes.

A URL list often sends thousands of rows to one host. Opening all of them at once overflows a small
server's listen backlog; the dropped SYNs then wait for TCP's retransmit timers (1 s, 3 s, 7 s ...),
and a download that should take seconds takes minutes. And a fixed cap that is polite to a small
host is a brake on a big one. `HostGate` lets at most `limit` requests to a host be in flight in
this process (every shard's event loop shares it). `limit` starts at `download.per_host_connections`
and adapts like TCP's congestion window, between 1 and GROWTH x that start:

- a connect that fails (refused, reset, timed out) halves the limit and pauses the host for a back-off
  that doubles with each such round (failures during a pause belong to its round; at most
  MAX_PAUSE_S); the row waits and tries again;
- a connect that succeeds but takes longer than STALL_S (a SYN was dropped and retransmitted), an
  answer of 429 or 503 or none in time (`overloaded`), or an answer SLOWER times slower than the
  host's fastest of late (`answered`; queueing on the host's side) shrinks the limit too, without a
  pause, unless the request started before the last shrink (one burst is one signal);
- clean connects and clean answers raise the limit: by one per `limit` of them up to the start
  (recovery), and above the start only while rows are waiting for the host (the limit is what holds
  them back): by half per round until the host first struggles (slow start), then by one. Each
  shrink sets a ceiling at 3/4 of the limit that struggled, so the limit settles just below what
  the host takes; every PROBE x ceiling clean events raise the ceiling by one (a host that
  recovers gets its connections back).

After GIVE_UP rounds of failed connects with no success between them (about 7 s of back-off at the
default `download.backoff_s`), the host counts as down for DOWN_S: its rows fail at once
(`connection_error`) instead of each waiting out the back-off. Other hosts go on untouched. The
gates are shared by thread-safe bookkeeping; each waiter is woken on its own event loop (directly
when that is the releasing thread's loop: a cross-thread wake-up costs a self-pipe write and read). A
redirect's hops count against the first host's slot; their connects teach their own hosts' gates.
`HostGates` keeps at most MAX_GATES gates: beyond that, the least recently used idle ones (nothing in
flight or waiting, not paused or down) are forgotten, so a list of millions of distinct hosts holds
a bounded table.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque

STALL_S = 0.9  # Linux retransmits a dropped SYN after 1 s: a connect this slow lost one
MAX_PAUSE_S = 8.0
GIVE_UP = 4
PROBE = 8
DOWN_S = 60.0
GROWTH = 8  # the limit grows to at most GROWTH x download.per_host_connections
SLOWER = 3.0  # an answer this many times slower than the host's fastest of late ...
SLOW_SLACK_S = 0.1  # ... and this much slower (scheduling noise on a busy client is not the host)
BASE_WINDOW = 64  # "of late": the fastest answer of the previous window of answers
MAX_GATES = 4096


class HostDown(Exception):
    """The host failed GIVE_UP rounds of connects in a row; its rows are not tried for a while."""


class HostGate:
    """At most `limit` requests in flight to one host; `limit` adapts between 1 and GROWTH x `cap`
    (`cap`: where it starts, and where recovery without waiting rows stops)."""

    def __init__(self, cap: int, backoff_s: float):
        self.cap, self.limit, self.backoff_s = cap, cap, backoff_s
        self.most = cap * GROWTH
        self.ceiling = self.most
        self.slow_start = True  # until the host first struggles: grow by half per round
        self.active = 0  # requests in flight
        self.clean = 0  # clean connects and answers since the limit last changed
        self.probe = 0  # clean connects and answers since the ceiling last changed
        self.base = float("inf")  # the fastest answer of the previous window
        self.window_min, self.window = float("inf"), 0
        self.rounds = 0  # back-off rounds of failed connects, in a row
        self.shrinks = 0  # how often the limit was halved (reported by the stage)
        self.peak = cap  # the highest limit so far
        self.resume_at = 0.0  # monotonic time before which nothing starts
        self.shrunk_at = float("-inf")  # monotonic time of the last halving
        self.down_until = 0.0
        self.lock = threading.Lock()
        self.waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = deque()
        self.used = 0.0  # monotonic time of the last use (HostGates forgets idle gates)

    async def acquire(self) -> None:
        """Wait for a slot (and for the end of any pause); raises HostDown while the host is down."""
        loop = asyncio.get_running_loop()
        while True:
            with self.lock:
                now = self.used = time.monotonic()
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
                with self.lock:
                    if (loop, future) in self.waiters:
                        self.waiters.remove((loop, future))  # a wake-up must not go to it
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
        self._learn(seconds, slow=seconds > STALL_S)

    def answered(self, seconds: float) -> None:
        """A request was answered (body read) `seconds` after it started."""
        with self.lock:
            self.window_min, self.window = min(self.window_min, seconds), self.window + 1
            if self.window >= BASE_WINDOW or self.base == float("inf"):
                self.base, self.window_min, self.window = self.window_min, float("inf"), 0
            slow = seconds > SLOWER * self.base and seconds - self.base > SLOW_SLACK_S
        self._learn(seconds, slow)

    def _learn(self, seconds: float, slow: bool) -> None:
        """A slow connect or answer shrinks the limit; a clean one may grow it."""
        with self.lock:
            if slow:
                self._struggled(seconds)
                return
            grew = self._clean()
        if grew:
            self._wake()

    def overloaded(self, seconds: float) -> None:
        """The host answered 429 or 503, or not in time, `seconds` after the request started."""
        with self.lock:
            self._struggled(seconds)

    def _struggled(self, seconds: float) -> None:
        """Shrink, once per burst: not for a request that started before the last shrink."""
        if time.monotonic() - seconds >= self.shrunk_at:
            self._shrink()

    def _clean(self) -> bool:
        """One clean connect or answer; returns whether the limit grew. Above the start, only
        while rows wait for the host: otherwise the limit is not what holds the host back."""
        if self.limit >= self.cap and not self.waiters:
            return False
        self.clean += 1
        self.probe += 1
        if self.probe >= PROBE * self.ceiling and self.ceiling < self.most:
            self.ceiling, self.probe = self.ceiling + 1, 0
        if self.clean < self.limit or self.limit >= self.ceiling:
            return False
        step = max(1, self.limit // 2) if self.slow_start and self.limit >= self.cap else 1
        self.limit, self.clean = min(self.ceiling, self.limit + step), 0
        self.peak = max(self.peak, self.limit)
        return True

    def connect_failed(self) -> None:
        """A connect was refused, reset or timed out: shrink, pause, maybe give the host up."""
        with self.lock:
            now = time.monotonic()
            if now < self.resume_at:
                return  # started before this pause: the round is already counted
            self._shrink()
            self.rounds += 1
            self.resume_at = now + min(MAX_PAUSE_S, self.backoff_s * 2 ** (self.rounds - 1))
            down = self.rounds >= GIVE_UP
            if down:
                self.down_until, self.rounds = now + DOWN_S, 0
        if down:
            self._wake(everyone=True)  # each waiter sees the host down and fails its row now

    def _shrink(self) -> None:
        self.ceiling = max(1, self.limit - max(1, self.limit // 4))
        self.limit, self.clean, self.probe = max(1, self.limit // 2), 0, 0
        self.shrinks += 1
        self.shrunk_at = time.monotonic()
        self.slow_start = False

    def _wake(self, everyone: bool = False) -> None:
        """Wake as many waiters as there are free slots, or all of them (each re-checks under the
        lock)."""
        with self.lock:
            free = len(self.waiters) if everyone else self.limit - self.active
            woken: list = []
            while self.waiters and len(woken) < free:
                loop, future = self.waiters.popleft()
                if not future.done() and not loop.is_closed():  # skip a cancelled row's entry
                    woken.append((loop, future))
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
    """The gate of each host (`host:port`), created on first use; thread-safe; at most MAX_GATES
    kept (idle ones forgotten, least recently used first)."""

    def __init__(self, cap: int, backoff_s: float, max_gates: int = MAX_GATES):
        self.cap, self.backoff_s, self.max_gates = cap, backoff_s, max_gates
        self.gates: OrderedDict[str, HostGate] = OrderedDict()
        self.lock = threading.Lock()

    def gate(self, host: str, port: int) -> HostGate:
        key = f"{host.lower()}:{port}"
        with self.lock:
            gate = self.gates.get(key)
            if gate is None:
                if len(self.gates) >= self.max_gates:
                    self._forget_idle()
                gate = self.gates[key] = HostGate(self.cap, self.backoff_s)
            self.gates.move_to_end(key)
            return gate

    def _forget_idle(self) -> None:
        """Drop the least recently used idle gates until a quarter of the table is free (one pass
        per quarter of new hosts). Busy, paused and down gates stay: their state still matters."""
        now, room = time.monotonic(), self.max_gates - self.max_gates // 4
        for key in list(self.gates):
            if len(self.gates) <= room:
                return
            gate = self.gates[key]
            with gate.lock:
                idle = not gate.active and not gate.waiters
                if idle and now >= gate.resume_at and now >= gate.down_until:
                    del self.gates[key]


_SHARED: dict[tuple[int, float], HostGates] = {}
_SHARED_LOCK = threading.Lock()


def shared_gates(cap: int, backoff_s: float) -> HostGates:
    """The process-wide gates for these settings: every shard of a download shares them."""
    with _SHARED_LOCK:
        return _SHARED.setdefault((cap, backoff_s), HostGates(cap, backoff_s))
