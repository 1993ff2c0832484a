"""The training order over several subsets (`subsets` in the profile), and what each one got.

Every sample's id is `NAME/ID` (the subsets stage, `tasks.subsets`), so the order knows each cached
sample's subset. Both kinds stay a pure function of (seed, epoch) and the batch index, so a resumed
run draws the same batches (`sdflow.training.schedules`):

- repeats (kohya's meaning): epoch e is one `EpochOrder` in which each sample of a subset with
  `repeats: r` is r entries of the permutation, so it is seen exactly r times per epoch; buckets
  apply across subsets (a batch holds one bucket, from any subset).
- weights: each subset has its own `EpochOrder` (its own seed), and batch k of the global stream is
  the next batch of the subset drawn for k by share (`torch.multinomial`, seeded per block of
  `BLOCK` batches); a batch holds one subset and one bucket. An epoch is as many batches as the
  subsets' own epochs together.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import torch

from sdflow.config.subsets import SubsetPlan, subset_plan
from sdflow.errors import UserError
from sdflow.store.stageio import Manifest
from sdflow.training.latent_data import CachedLatents, read_shard_ids
from sdflow.training.schedules import EpochOrder, bucket_plan

log = logging.getLogger(__name__)
SEPARATOR = "/"  # `NAME/ID`, as tasks.subsets writes it
BLOCK = 4096  # batches whose subsets one seeded draw decides (weights)


def subset_of(ids: Sequence[str], names: Sequence[str]) -> list[int]:
    """Each sample's subset (its index in `names`), from its `NAME/ID` id."""
    number = {name: i for i, name in enumerate(names)}
    members = [number.get(sample.split(SEPARATOR, 1)[0], -1) for sample in ids]
    if -1 in members:
        stray = ids[members.index(-1)]
        raise UserError(
            f"Cached sample {stray!r} belongs to none of the subsets {list(names)}: the latents "
            "cache was built from other subsets; rerun the subsets and latents stages."
        )
    return members


class WeightedOrder:
    """Batches drawn subset by subset in proportion to their weights (see the module docstring)."""

    def __init__(
        self,
        buckets: Sequence[str],
        members: Sequence[int],
        weights: Sequence[float],
        batch_size: int,
        seed: int,
    ):
        self.rows = [[i for i, m in enumerate(members) if m == s] for s in range(len(weights))]
        self.orders = [
            EpochOrder([buckets[i] for i in rows], batch_size, seed + 7919 * (s + 1))
            for s, rows in enumerate(self.rows)
        ]
        self.shares = torch.tensor(weights, dtype=torch.float64)
        self.per_epoch = sum(order.per_epoch for order in self.orders)
        self.batch_size, self.seed = batch_size, seed
        self.names = sorted(set(buckets))
        self.counts = [list(buckets).count(name) for name in self.names]
        self._blocks: list[tuple[list[int], list[int]]] = []  # per block: subset, its batch index
        self._drawn = torch.zeros(len(weights), dtype=torch.int64)  # batches per subset so far

    def batch(self, index: int) -> list[int]:
        """Batch `index` of the endless stream (dataset indices)."""
        block, offset = divmod(index, BLOCK)
        while len(self._blocks) <= block:
            self._draw_block()
        subsets, positions = self._blocks[block]
        subset = subsets[offset]
        return [self.rows[subset][i] for i in self.orders[subset].batch(positions[offset])]

    def _draw_block(self) -> None:
        generator = torch.Generator().manual_seed(
            self.seed * 1_000_003 + 500_009 + len(self._blocks)
        )
        draws = torch.multinomial(self.shares, BLOCK, replacement=True, generator=generator)
        hits = torch.nn.functional.one_hot(draws, len(self.shares))
        before = hits.cumsum(0) - hits + self._drawn  # batches of the same subset drawn earlier
        positions = before.gather(1, draws[:, None])[:, 0]
        self._drawn += hits.sum(0)
        self._blocks.append((draws.tolist(), positions.tolist()))

    def summary(self) -> dict[str, dict[str, int]]:
        counts = dict(zip(self.names, self.counts, strict=True))
        return bucket_plan(
            {n.lstrip("@") or "square": c for n, c in counts.items()}, self.batch_size
        )


def order_of(
    buckets: Sequence[str], ids: Sequence[str], batch_size: int, seed: int, plan: SubsetPlan
) -> EpochOrder | WeightedOrder:
    """The training order of samples with these buckets and ids under `plan`."""
    members = subset_of(ids, plan.names)
    if plan.weights is None:
        return EpochOrder(buckets, batch_size, seed, [plan.repeats[m] for m in members])
    present = set(members)
    empty = [name for s, name in enumerate(plan.names) if s not in present]
    if empty:
        raise UserError(
            f"Subset(s) {empty} have no training samples (all filtered out or held out), so "
            "their weight cannot be drawn: add images, lower eval.held_out_fraction or remove them."
        )
    return WeightedOrder(buckets, members, plan.weights, batch_size, seed)


def cached_ids(dataset: CachedLatents) -> list[str]:
    """Every cached row's id, in row order (shard headers only)."""
    return [sample for path in dataset.paths for sample in read_shard_ids(path)]


def subset_order(
    dataset: CachedLatents, batch_size: int, seed: int, plan: SubsetPlan
) -> EpochOrder | WeightedOrder:
    """The order `CachedBatches.order` uses with `subsets` (logged: images and share of each)."""
    ids = cached_ids(dataset)
    images = Counter(subset_of(ids, plan.names))
    shares = plan.settings().items()
    log.info("subsets: %s", {n: {"images": images[i], **v} for i, (n, v) in enumerate(shares)})
    return order_of(dataset.buckets(), ids, batch_size, seed, plan)


def seen_per_subset(
    order: EpochOrder | WeightedOrder, members: Sequence[int], batches: int, subsets: int
) -> list[int]:
    """Samples of each subset in batches 0 .. `batches` - 1 of the stream."""
    seen = torch.zeros(subsets, dtype=torch.int64)
    member = torch.tensor(members, dtype=torch.int64)
    for index in range(batches):
        seen += torch.bincount(member[order.batch(index)], minlength=subsets)
    return seen.tolist()


def subset_report(
    config, latents: Manifest | None, workdir: str, steps: int, world: int
) -> dict[str, dict]:
    """Per subset: training images, repeats or weight, samples seen in `steps` optimizer steps of
    `world` processes (the train manifest's `info.subsets`); {} without `subsets`."""
    plan, train = subset_plan(config), config.train
    if plan is None or latents is None:
        return {}
    dataset = CachedLatents(workdir, latents)
    ids = cached_ids(dataset)
    members = subset_of(ids, plan.names)
    order = order_of(dataset.buckets(), ids, train.batch_size, train.seed, plan)
    batches = steps * train.gradient_accumulation * world
    seen = seen_per_subset(order, members, batches, len(plan.names))
    report = {}
    for s, (name, share) in enumerate(plan.settings().items()):
        report[name] = {"images": members.count(s), **share, "samples_seen": seen[s]}
    return {"subsets": report}
