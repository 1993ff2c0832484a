"""Streaming aggregates for the dataset report: each takes the rows a batch at a time and holds a
bounded amount, however many rows pass.

A `Reservoir` keeps how many rows it saw and a uniform random sample of at most `capacity` of them
(Vitter's algorithm R, batch by batch, seeded: the same rows in the same order give the same
sample; below `capacity` the sample is every row, in order), for the histograms. `ScoreSeries`
holds at most `MAX_SERIES` named reservoirs; `MeasuredScores` fills them from the values the filter
wrote into its failure details. `DuplicateClusters` groups the rows dropped as duplicates by the
kept sample they duplicate, pruned to the largest groups past `CLUSTER_PRUNE_AT` groups.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import ArrayLike

# failure detail: the kept twin's id, alone or as "<id> at <measure> <value>"
DUPLICATE_REASONS = ("duplicate", "near_duplicate", "semantic_duplicate")
TWIN = re.compile(r"(?P<id>.+?) at (?P<measure>[A-Za-z ]+?) (?P<value>-?\d+(?:\.\d+)?(?:e-?\d+)?)")
CLUSTERS = 16
CLUSTER_SIZE = 6
CLUSTER_PRUNE_AT = 20_000  # kept samples with duplicates counted at a time
MAX_SERIES = 32  # score series (metadata fields, measured values); more are left out
BATCH = 10_000  # failure rows turned into Python objects at a time
# "<name> <measured> <op> [<word>] <threshold>", e.g. "ratio 5.00 > 2.0", "similarity 0.21 < min 0.28"
MEASURED = re.compile(
    r"([A-Za-z_][\w.]*)[ =:]+(-?\d+(?:\.\d+)?(?:e-?\d+)?)\s*[<>]=?\s*(?:[A-Za-z_]+\s+)?-?\d"
)
CAPACITY = 100_000  # rows a histogram is drawn from
SEED = 0


class Reservoir:
    """At most `capacity` rows of `width` numbers each, sampled uniformly, and the row count."""

    def __init__(self, width: int = 1, capacity: int | None = None, seed: int = SEED):
        self.count = 0
        self.width = width
        self.capacity = CAPACITY if capacity is None else capacity
        self._rows = np.empty((16, width), np.float64)  # grown by doubling up to capacity
        self._rng = np.random.default_rng(seed)

    def extend(self, values: ArrayLike) -> None:
        """Add a batch of rows (numbers, or rows of `width` numbers)."""
        batch = np.asarray(values, np.float64).reshape(-1, self.width)
        room = max(min(self.capacity - self.count, len(batch)), 0)
        if room:
            filled = self.count
            if filled + room > len(self._rows):
                grown = np.empty(
                    (min(max(2 * len(self._rows), filled + room), self.capacity), self.width)
                )
                grown[:filled] = self._rows[:filled]
                self._rows = grown
            self._rows[filled : filled + room] = batch[:room]
        rest = batch[room:]
        if len(rest):
            seen = self.count + room + np.arange(len(rest))  # each row's place in the stream
            slots = self._rng.integers(0, seen + 1)  # a row replaces slot j < capacity
            keep = slots < self.capacity
            self._rows[slots[keep]] = rest[keep]  # a later row wins a slot, as one at a time
        self.count += len(batch)

    def append(self, value: float) -> None:
        self.extend([value])

    @property
    def values(self) -> np.ndarray:
        """The sampled rows, [n, width] (n = min(count, capacity))."""
        return self._rows[: min(self.count, self.capacity)]

    def column(self, index: int = 0) -> np.ndarray:
        return self.values[:, index]

    def __iter__(self) -> Iterator[float]:
        """The sampled numbers of a one-number-per-row reservoir."""
        return iter(self.column().tolist())


@dataclass
class Cluster:
    """A kept sample and the samples the filter dropped as its (near-)duplicates."""

    kept: str
    members: list[tuple[str, str]]  # (id, reason)
    size: int  # all members, also those not shown


class ScoreSeries:
    """Named series of numbers, each a bounded sample (`Reservoir`); at most `MAX_SERIES` names,
    the first ones seen."""

    def __init__(self) -> None:
        self.reservoirs: dict[str, Reservoir] = {}

    def extend(self, batch: Mapping[str, list[float]]) -> None:
        for title, values in batch.items():
            if title not in self.reservoirs and len(self.reservoirs) < MAX_SERIES:
                self.reservoirs[title] = Reservoir()
            if title in self.reservoirs:
                self.reservoirs[title].extend(values)

    def series(self) -> dict[str, Reservoir]:
        return dict(sorted(self.reservoirs.items()))


class MeasuredScores(ScoreSeries):
    """Values the filter measured on the rows it rejected, from details such as
    "ratio 5.00 > 2.0", "similarity=0.2 < min 0.28" or "k00 at Hamming distance 3": one series
    per reason and measured name; failure tables added one at a time."""

    def add(self, failures: pa.Table) -> None:
        for batch in failures.select(["reason", "detail"]).to_batches(BATCH):
            values: dict[str, list[float]] = defaultdict(list)
            pairs = zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True)
            for reason, detail in pairs:
                for name, value in MEASURED.findall(detail or ""):
                    values[f"rejected ({reason}): {name}"].append(float(value))
                twin = TWIN.fullmatch(detail or "") if reason in DUPLICATE_REASONS else None
                if twin:  # "k00 at Hamming distance 3"
                    values[f"rejected ({reason}): {twin['measure']}"].append(float(twin["value"]))
            self.extend(values)


def measured_scores(failures: pa.Table) -> dict[str, Reservoir]:
    """`MeasuredScores` of one failures table."""
    scores = MeasuredScores()
    scores.add(failures)
    return scores.series()


def twin_id(detail: str) -> str:
    """The kept sample a duplicate's failure detail names."""
    twin = TWIN.fullmatch(detail)
    return twin["id"] if twin else detail


class DuplicateClusters:
    """Samples dropped as duplicates, grouped by the kept sample their detail names; failure tables
    added one at a time. Past `prune_at` groups only the largest quarter is kept."""

    def __init__(self, prune_at: int = CLUSTER_PRUNE_AT) -> None:
        self.prune_at = prune_at
        self.groups: dict[str, Cluster] = {}

    def add(self, failures: pa.Table) -> None:
        reasons = failures.column("reason")
        duplicates = failures.filter(pc.is_in(reasons, pa.array(DUPLICATE_REASONS)))
        for batch in duplicates.select(["id", "reason", "detail"]).to_batches(BATCH):
            for row in batch.to_pylist():
                if row["detail"]:
                    twin = twin_id(row["detail"])
                    cluster = self.groups.setdefault(twin, Cluster(twin, [], 0))
                    cluster.size += 1
                    if len(cluster.members) < CLUSTER_SIZE:
                        cluster.members.append((row["id"], row["reason"]))
            if len(self.groups) > self.prune_at:
                kept = self.largest(self.prune_at // 4)
                self.groups = {c.kept: c for c in kept}

    def largest(self, limit: int) -> list[Cluster]:
        return sorted(self.groups.values(), key=lambda c: (-c.size, c.kept))[:limit]


def duplicate_clusters(failures: pa.Table, limit: int = CLUSTERS) -> list[Cluster]:
    """The largest groups of samples dropped as duplicates of the same kept sample."""
    clusters = DuplicateClusters()
    clusters.add(failures)
    return clusters.largest(limit)
