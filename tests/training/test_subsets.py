"""The training order over subsets (sdflow.training.subsets): repeats counted from the real sampler
against numbers computed here, the same order after a resume, weights as batch shares."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from sdflow.config.subsets import SubsetPlan
from sdflow.errors import UserError
from sdflow.training.schedules import StepBatches
from sdflow.training.subsets import WeightedOrder, order_of, seen_per_subset, subset_of

IDS = [f"few/{i:03d}" for i in range(10)] + [f"many/{i:03d}" for i in range(10)]
REPEATS = SubsetPlan(("few", "many"), (1, 4), None)


def test_repeats_one_epoch_sees_each_image_repeats_times():
    # two buckets across both subsets: a batch never mixes them, every sample still counted
    buckets = ["@32x32" if i % 3 else "@48x16" for i in range(20)]
    order = order_of(buckets, IDS, 4, seed=3, plan=REPEATS)
    seen = Counter(i for k in range(order.per_epoch) for i in order.batch(k))
    assert seen == {i: 1 if i < 10 else 4 for i in range(20)}
    # independently: entries per bucket = images of that bucket times their subset's repeats,
    # batches per epoch = ceil(entries / batch size) summed over buckets
    entries = Counter()
    for i, bucket in enumerate(buckets):
        entries[bucket] += 1 if i < 10 else 4
    assert order.per_epoch == sum(math.ceil(n / 4) for n in entries.values())
    for k in range(order.per_epoch):
        assert len({buckets[i] for i in order.batch(k)}) == 1


def test_resumed_sampler_draws_the_same_order():
    buckets = [""] * 20
    whole = StepBatches(order_of(buckets, IDS, 4, seed=7, plan=REPEATS), start=0, stop=40)
    first = StepBatches(order_of(buckets, IDS, 4, seed=7, plan=REPEATS), start=0, stop=17)
    resumed = StepBatches(order_of(buckets, IDS, 4, seed=7, plan=REPEATS), start=17, stop=40)
    assert list(first) + list(resumed) == list(whole)  # 40 batches: past the first epoch (13)
    other = StepBatches(order_of(buckets, IDS, 4, seed=8, plan=REPEATS), start=0, stop=40)
    assert list(other) != list(whole)


def test_weights_share_batches_and_resume():
    plan = SubsetPlan(("few", "many"), None, (1.0, 3.0))
    order = order_of([""] * 20, IDS, 5, seed=0, plan=plan)
    assert isinstance(order, WeightedOrder)
    batches = 12_000  # three seeded blocks of draws
    members = subset_of(IDS, plan.names)
    subsets_per_batch = [{members[i] for i in order.batch(k)} for k in range(batches)]
    assert all(len(s) == 1 for s in subsets_per_batch)  # a batch holds one subset
    share = sum(1 for s in subsets_per_batch if s == {1}) / batches
    # binomial: 5 standard deviations of the share of 12,000 draws with p = 0.75 (0.020)
    tolerance = 5 * math.sqrt(0.75 * 0.25 / batches)
    assert abs(share - 0.75) < tolerance
    # full batches (10 images per subset, batch 5): the samples' shares are the batches'
    seen = seen_per_subset(order, members, batches, 2)
    assert seen[1] / sum(seen) == pytest.approx(share)
    # within a subset, its own epochs: every image once per 2 of its batches
    few = [i for k in range(batches) if subsets_per_batch[k] == {0} for i in order.batch(k)]
    assert Counter(few[:20]) == {i: 2 for i in range(10)}
    fresh = order_of([""] * 20, IDS, 5, seed=0, plan=plan)  # resume at batch 9,000
    assert [fresh.batch(k) for k in range(9_000, 9_100)] == [
        order.batch(k) for k in range(9_000, 9_100)
    ]


def test_samples_seen_per_subset_matches_counting():
    order = order_of([""] * 20, IDS, 3, seed=1, plan=REPEATS)
    members = subset_of(IDS, REPEATS.names)
    expected = [0, 0]
    for k in range(25):
        for i in order.batch(k):
            expected[0 if i < 10 else 1] += 1
    assert seen_per_subset(order, members, 25, 2) == expected


def test_ids_of_another_subset_and_empty_weighted_subsets_are_refused():
    with pytest.raises(UserError, match="belongs to none of the subsets"):
        subset_of(["few/1", "gone/2"], ["few", "many"])
    plan = SubsetPlan(("few", "many", "none"), None, (1.0, 1.0, 1.0))
    with pytest.raises(UserError, match=r"\['none'\] have no training samples"):
        order_of([""] * 20, IDS, 4, seed=0, plan=plan)
