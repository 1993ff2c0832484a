"""Worker threads fed from an event loop, with one loop wake-up per burst of results, not per result.

`loop.run_in_executor` costs, per call, a concurrent and an asyncio future chained by callbacks and a
self-pipe write (a syscall, and a wake-up of the loop) when the result arrives. The download stage
hands every image to a decode thread and back; at hundreds of images a second that bookkeeping ran
on the event loop's thread, under the interpreter lock its fetching needs. `ThreadHandoff` puts
jobs on a queue its threads take from, and a finished job's result on a list: only the result that
finds the list empty schedules the loop to drain it, so a burst of results costs one wake-up.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any


class ThreadHandoff:
    """`workers` threads; `await handoff.run(fn, *args)` from an event loop; use as a context
    manager (leaving it lets the threads finish the queued jobs and joins them)."""

    def __init__(self, workers: int, name: str = "sdflow-worker"):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        # per event loop: results not yet handed to it (a drain is scheduled while non-empty)
        self.finished: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, bool, Any]]] = {}
        self.threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self.threads:
            thread.start()

    def __enter__(self) -> ThreadHandoff:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for _ in self.threads:
            self.jobs.put(None)
        for thread in self.threads:
            thread.join()

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """A future, on the running loop, for `fn(*args)` run in a worker thread."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.jobs.put((loop, future, fn, args))
        return future

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            loop, future, fn, args = job
            try:
                outcome = (future, True, fn(*args))
            except Exception as exc:  # handed to the awaiting coroutine, as an executor would
                outcome = (future, False, exc)
            with self.lock:
                waiting = self.finished.setdefault(loop, [])
                waiting.append(outcome)
                first = len(waiting) == 1  # else a drain is already scheduled
            if first:
                try:
                    loop.call_soon_threadsafe(self._drain, loop)
                except RuntimeError:  # the loop is closed: nobody awaits the result any more
                    with self.lock:
                        self.finished.pop(loop, None)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        with self.lock:
            finished = self.finished.pop(loop)
        for future, ok, value in finished:
            if future.done():  # cancelled while it ran
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
