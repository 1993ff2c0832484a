"""Shard job timing: the union of job spans, and what a build records of them."""

from __future__ import annotations

import pytest

from sdflow.store.shardmap import ShardTimes, busy_seconds


@pytest.mark.parametrize(
    ("spans", "union"),
    [
        ([], 0.0),
        ([(10.0, 12.0)], 2.0),
        ([(0.0, 2.0), (1.0, 3.0)], 3.0),  # overlapping: 0..3
        ([(5.0, 6.0), (0.0, 1.0)], 2.0),  # apart, given out of order
        ([(0.0, 10.0), (2.0, 3.0), (4.0, 5.0)], 10.0),  # nested in the first
        ([(0.0, 2.0), (2.0, 4.0), (6.0, 7.5)], 5.5),  # touching, then a gap
    ],
)
def test_busy_seconds_is_the_length_of_the_union(spans, union):
    assert busy_seconds(spans) == pytest.approx(union)


def test_shard_times_info_sums_and_unites():
    times = ShardTimes()
    assert times.add((100.0, 104.0, 7)) == pytest.approx(4.0)
    times.add((102.0, 106.0, 8))
    times.add((110.0, 111.5, 7))
    # by hand: 4 + 4 + 1.5 summed; 100..106 and 110..111.5 busy; processes 7 and 8
    assert times.info() == {
        "shards_timed": 3,
        "shard_processes": 2,
        "shard_seconds": 9.5,
        "shard_busy_seconds": 7.5,
    }
