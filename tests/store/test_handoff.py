"""`ThreadHandoff`: jobs run on its threads, results reach the loop with one wake-up per burst."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from sdflow.store.handoff import ThreadHandoff


def test_results_exceptions_and_one_wake_up_for_a_burst():
    wakes: list[tuple] = []
    names: set[str] = set()

    def square(n: int) -> int:
        names.add(threading.current_thread().name)
        if n == 7:
            raise ValueError("seven")
        return n * n

    async def main(handoff: ThreadHandoff) -> list:
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (wakes.append(a), real(*a))[1]  # type: ignore
        futures = [handoff.run(square, n) for n in range(40)]
        time.sleep(0.5)  # the loop is busy: every job finishes before it looks again
        return await asyncio.gather(*futures, return_exceptions=True)

    with ThreadHandoff(2, "test-decode") as handoff:
        results = asyncio.run(main(handoff))
    assert [r for i, r in enumerate(results) if i != 7] == [i * i for i in range(40) if i != 7]
    assert isinstance(results[7], ValueError) and str(results[7]) == "seven"
    assert len(wakes) == 1  # run_in_executor would have written to the self-pipe 40 times
    assert names <= {"test-decode_0", "test-decode_1"}
    assert not any(t.is_alive() for t in handoff.threads)


def test_results_reach_each_loop_that_asked():
    with ThreadHandoff(2) as handoff:

        async def ask(base: int) -> list[int]:
            return await asyncio.gather(*(handoff.run(lambda n: n + base, n) for n in range(20)))

        found: dict[int, list[int]] = {}
        threads = [
            threading.Thread(target=lambda b=b: found.update({b: asyncio.run(ask(b))}))
            for b in (0, 1000)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    assert found == {0: list(range(20)), 1000: list(range(1000, 1020))}


def test_a_cancelled_wait_does_not_break_the_workers():
    async def main(handoff: ThreadHandoff) -> int:
        slow = handoff.run(time.sleep, 0.2)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(slow, 0.01)
        return await handoff.run(abs, -3)

    with ThreadHandoff(1) as handoff:
        assert asyncio.run(main(handoff)) == 3
