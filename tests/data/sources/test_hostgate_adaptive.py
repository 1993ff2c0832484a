"""The per-host limit adapts to how the host answers (`sdflow.data.sources.hostgate`): it grows past
its start for a host that answers fast while rows wait, shrinks for one that slows or asks for less,
and the table of gates stays bounded. Deterministic: answer times are given, never measured."""

from __future__ import annotations

import asyncio

from sdflow.data.sources.hostgate import BASE_WINDOW, GIVE_UP, GROWTH, HostDown, HostGate, HostGates


async def _rounds(gate: HostGate, seconds: list[float], rows: int) -> list[int]:
    """`rows` requests queue on the gate; each round, every request in flight is answered after
    the round's `seconds` and released. Returns the limit after each round."""
    done = asyncio.Event()
    admitted: list[int] = []

    async def row() -> None:
        await gate.acquire()
        admitted.append(1)
        await done.wait()

    tasks = [asyncio.create_task(row()) for _ in range(rows)]
    await asyncio.sleep(0)
    limits = []
    for answer in seconds:
        for _ in range(gate.active):
            gate.answered(answer)
        for _ in range(gate.active):
            gate.release()
        for _ in range(3):  # the woken rows take their slots
            await asyncio.sleep(0)
        limits.append(gate.limit)
    done.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return limits


def test_a_fast_host_with_waiting_rows_grows_by_half_per_round_up_to_the_bound():
    gate = HostGate(4, 0.1)
    limits = asyncio.run(_rounds(gate, [0.01] * 12, rows=400))
    expected, limit = [], 4
    for _ in range(12):
        limit = min(4 * GROWTH, limit + limit // 2)  # slow start: by half per round
        expected.append(limit)
    assert limits == expected and limits[-1] == 4 * GROWTH == gate.peak
    assert gate.shrinks == 0


def test_without_waiting_rows_the_limit_stays_at_its_start():
    gate = HostGate(4, 0.1)
    for _ in range(1000):
        gate.answered(0.01)
        gate.connected(0.001)
    assert gate.limit == gate.peak == 4


def test_a_host_that_slows_shrinks_once_per_burst_then_grows_by_one():
    gate = HostGate(16, 0.1)
    limits = asyncio.run(_rounds(gate, [0.01, 0.01], rows=200))
    assert limits == [24, 36]
    gate.answered(0.5)  # > 3x the fastest (0.01) and 0.1 s more: queueing on the host
    assert (gate.limit, gate.ceiling, gate.shrinks) == (18, 27, 1)
    gate.answered(2.0)  # started before that shrink: the same burst
    assert gate.limit == 18
    limits = asyncio.run(_rounds(gate, [0.01] * 3, rows=200))
    assert limits == [19, 20, 21]  # after a struggle: one per round, no more slow start


def test_a_steadily_slow_host_is_not_mistaken_for_a_slowing_one():
    gate = HostGate(4, 0.1)
    limits = asyncio.run(_rounds(gate, [0.8] * 4, rows=200))  # 0.8 s every time: its pace
    assert limits == [6, 9, 13, 19] and gate.shrinks == 0


def test_the_fastest_answer_is_forgotten_after_a_window():
    """A host whose pace changes for good (0.01 s, then 0.5 s) shrinks once, and once the window
    has passed the new pace is its norm: no further shrinks."""
    gate = HostGate(8, 0.1)
    gate.answered(0.01)
    gate.answered(0.5)
    assert gate.shrinks == 1
    gate.shrunk_at = float("-inf")  # every later answer counts as a new burst
    for _ in range(BASE_WINDOW):
        gate.answered(0.5)
    shrinks = gate.shrinks
    for _ in range(3 * BASE_WINDOW):
        gate.answered(0.5)
    assert gate.base == 0.5 and gate.shrinks == shrinks


def test_429_503_and_timeouts_shrink_without_pausing():
    gate = HostGate(16, 0.1)
    gate.overloaded(0.01)
    assert (gate.limit, gate.resume_at) == (8, 0.0)
    gate.overloaded(30.0)  # started before the shrink
    assert gate.limit == 8


def test_the_table_of_gates_is_bounded_and_keeps_what_matters():
    gates = HostGates(4, 0.1, max_gates=8)
    busy = gates.gate("busy.example", 80)
    busy.active = 1  # a request in flight
    down = gates.gate("down.example", 80)
    down.down_until = float("inf")
    for i in range(100):
        gates.gate(f"tail-{i}.example", 80)  # the long tail: one row each
        gates.gate("big.example", 80)  # a big host, used all along
    assert len(gates.gates) <= 8
    kept = set(gates.gates)
    assert {"busy.example:80", "down.example:80", "big.example:80", "tail-99.example:80"} <= kept
    assert "tail-0.example:80" not in kept
    assert gates.gate("busy.example", 80) is busy  # the same gate, its state intact


def test_a_cancelled_waiter_neither_takes_a_wake_up_nor_breaks_a_release():
    """A row cancelled while waiting, on a shard's loop that has since closed: the next release
    (another shard's loop) wakes a live waiter instead of calling into the closed loop."""
    gate = HostGate(1, 0.1)

    async def shard_that_gives_up() -> None:
        await gate.acquire()  # holds the only slot past this loop's end
        waiter = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)

    async def next_shard() -> None:
        waiter = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        gate.release()  # the first shard's slot
        await asyncio.wait_for(waiter, 5)
        gate.release()

    asyncio.run(shard_that_gives_up())
    asyncio.run(next_shard())
    assert gate.active == 0 and not gate.waiters


def test_rows_waiting_when_the_host_goes_down_all_fail_at_once():
    """Every waiter learns that the host is down (before: one was woken, the rest waited forever
    once nothing was in flight, and a list with a refusing host never finished)."""
    gate = HostGate(1, 0.001)

    async def rows() -> list:
        await gate.acquire()  # the one slot, held
        waiters = [asyncio.create_task(gate.acquire()) for _ in range(5)]
        await asyncio.sleep(0)
        for _ in range(GIVE_UP):
            gate.connect_failed()
            await asyncio.sleep(0.02)  # past the pause (at most 8 ms here)
        gate.release()
        return await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 5)

    assert [type(r) for r in asyncio.run(rows())] == [HostDown] * 5
