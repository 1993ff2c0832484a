"""The data order of training (`sdflow.training.schedules`): an epoch order that depends on the step
only, covers each epoch once, keeps batches within a bucket, and shuffles globally."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdflow.training.schedules import EpochOrder, StepBatches

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_data_order_depends_on_step_only_and_covers_each_epoch():
    buckets = ["@16x8"] * 7 + ["@8x16"] * 5  # 7 and 5 samples, batches of 4: 2 + 2 per epoch
    order = EpochOrder(buckets, 4, seed=3)
    batches = list(StepBatches(order, start=0, stop=12))
    resumed = list(StepBatches(EpochOrder(buckets, 4, seed=3), start=5, stop=12))
    assert resumed == batches[5:]
    for epoch in range(3):  # every sample once per epoch, every batch from one bucket
        part = batches[epoch * 4 : epoch * 4 + 4]
        assert sorted(i for b in part for i in b) == list(range(12))
        assert all(len({buckets[i] for i in b}) == 1 for b in part)
        assert sorted(len(b) for b in part) == [1, 3, 4, 4]  # nothing dropped
    assert batches[:4] != batches[4:8]  # a fresh order each epoch
    assert list(StepBatches(EpochOrder(buckets, 4, seed=4), 0, 4)) != batches[:4]
    assert order.summary()["8x16"] == {"samples": 5, "batches": 2, "smaller_batch": 1}
    # two processes read alternate batches of the one stream
    ranks = [list(StepBatches(order, 0, 2, world=2, rank=r)) for r in (0, 1)]
    assert [ranks[0][0], ranks[1][0], ranks[0][1], ranks[1][1]] == batches[:4]


def test_data_order_is_a_global_shuffle_not_shard_by_shard():
    # rows 0-6 and 7-11 were two shards; an order walking one shard at a time mixes them in at most
    # one batch per epoch (where it crosses over)
    order = EpochOrder([""] * 12, 4, seed=0)
    mixed = [b for e in range(10) for b in order.batches(e) if min(b) < 7 <= max(b)]
    assert len(mixed) > 10
