"""How a data stage maps its per-shard work: in order in this process, or on a task runner.

A data stage cuts its work into shard jobs. A `ShardJob` holds only picklable values (the stage's
partial directory, the config, the shard index, the path of the shard's input), and a job function
`fn(job)` (a module-level function, importable by name) reads its input from disk, writes its shard
straight into the partial directory (a disk every worker shares) and returns a small, picklable
result. So a job runs the same in this thread, in a thread pool, or in a Dask worker process.

A `ShardMapper` is `mapper(fn, jobs) -> results`, one per job, in job order. `in_order` (what a
plain stage call uses) runs the jobs one after another and lazily: job i + 1 starts only when the
caller asks for its result, so a crash leaves every earlier shard finished. The Prefect mapper in
`sdflow.ops.orchestration` runs them as Prefect tasks on the runner `config.runner` selects.
Stages never depend on the order in which jobs finish, only on the order results are handed back,
so their outputs are byte-identical whichever mapper runs them.

A job also hands back its `Span` (wall-clock start and end, `time.time()`, comparable across the
processes of a host), and the stage records `ShardTimes.info()` in its manifest's `info` (never in
a fingerprinted file): how long its shard work took, to tell it from orchestration overhead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from sdflow.config import RunConfig
from sdflow.store.stageio import StageBuild

R = TypeVar("R")
Span = tuple[float, float, int]
"""A shard job's wall-clock (start, end) in `time.time()` seconds, and the id of its process."""


@dataclass(frozen=True)
class ShardJob:
    """One shard's work: everything a worker anywhere needs, and nothing that cannot be pickled."""

    build: StageBuild  # the partial directory the shard is written into
    config: RunConfig
    index: int
    source: str  # the shard's input: an upstream shard file, or rows staged for it


class ShardMapper(Protocol):
    def __call__(self, fn: Callable[[ShardJob], R], jobs: Iterable[ShardJob]) -> Iterator[R]: ...


def in_order(fn: Callable[[ShardJob], R], jobs: Iterable[ShardJob]) -> Iterator[R]:
    """Run each job when its result is asked for, in this thread."""
    for job in jobs:
        yield fn(job)


def windowed(
    submit: Callable[[ShardJob], Any], jobs: Iterable[ShardJob], window: int
) -> Iterator[Any]:
    """Results in job order, with at most `window` jobs submitted and not yet handed back.

    `submit(job)` returns a future with `.result()` and `.wait()` (Prefect's). Jobs are taken from
    `jobs` lazily, so a stage that stages inputs for its jobs never gets far ahead of the workers.
    When the caller stops early (an exception, `close()`), the jobs in flight are waited for, so no
    worker still writes into the partial directory after the stage has given up on it.
    """
    pending: list[Any] = []
    source = iter(jobs)
    try:
        for job in source:
            pending.append(submit(job))
            if len(pending) >= window:
                yield pending.pop(0).result()
        while pending:
            yield pending.pop(0).result()
    finally:
        for future in pending:
            future.wait()


def span_since(started: float) -> Span:
    """The span of a job that started at `started` (`time.time()`) and ends now, in this process."""
    return (started, time.time(), os.getpid())


def busy_seconds(spans: Iterable[tuple[float, float]]) -> float:
    """Seconds during which at least one of `spans` ran: the length of their union."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


@dataclass
class ShardTimes:
    """The spans of the shard jobs one build ran (shards finished before a crash are not timed)."""

    spans: list[tuple[float, float]] = field(default_factory=list)
    processes: set[int] = field(default_factory=set)

    def add(self, span: Span) -> float:
        """Record a job's span; returns its seconds."""
        self.spans.append((float(span[0]), float(span[1])))
        self.processes.add(int(span[2]))
        return span[1] - span[0]

    def info(self) -> dict[str, float | int]:
        """For the manifest's `info`: shards timed, their summed seconds, and the seconds during
        which at least one ran (`shard_busy_seconds`, at most the stage's wall time), and the
        number of processes they ran in (`shard_processes`)."""
        return {
            "shards_timed": len(self.spans),
            "shard_processes": len(self.processes),
            "shard_seconds": round(sum(stop - start for start, stop in self.spans), 3),
            "shard_busy_seconds": round(busy_seconds(self.spans), 3),
        }
