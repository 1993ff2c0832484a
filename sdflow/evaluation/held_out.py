"""The held-out split as evaluation reads it: the prompts (the held-out captions, FID's pool in shard
order and the grid's prompts, distinct ones first) and the real images FID compares against."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

import torch

from sdflow.config import RunConfig
from sdflow.errors import UserError
from sdflow.evaluation.features import decode_image
from sdflow.evaluation.scoring import Scorer
from sdflow.store.splits import is_held_out
from sdflow.store.stageio import Manifest, read_shards


def held_out_prompts(workdir: str, caption: Manifest, config: RunConfig) -> tuple[list, list]:
    """(pool, prompts): the first `eval.fid_samples` held-out captions in shard order (FID's
    prompts, matching its real images), and `eval.num_prompts` of them, distinct ones first."""
    ev = config.eval
    pool: list[str] = []
    distinct: dict[str, None] = {}
    repeats: list[str] = []
    for text in _held_out_captions(workdir, caption, ev.held_out_fraction):
        if len(pool) < ev.fid_samples:
            pool.append(text)
        if text in distinct:
            if len(repeats) < ev.num_prompts:
                repeats.append(text)
        elif len(distinct) < ev.num_prompts:
            distinct[text] = None
        if len(pool) >= ev.fid_samples and len(distinct) >= ev.num_prompts:
            break
    if not pool:
        raise UserError(
            f"No held-out samples to evaluate on: eval.held_out_fraction is "
            f"{ev.held_out_fraction}. Raise it (e.g. 0.05) or add data; held-out images are the "
            "real images FID compares against, and their captions the prompts."
        )
    return pool, (list(distinct) + repeats)[: ev.num_prompts]


def _held_out_captions(workdir: str, caption: Manifest, fraction: float) -> Iterator[str]:
    for table in read_shards(workdir, caption, columns=["id", "caption"]):
        ids, texts = table["id"].to_pylist(), table["caption"].to_pylist()
        for sample_id, text in zip(ids, texts, strict=True):
            if is_held_out(sample_id, fraction):
                yield text or ""


def add_real_images(scorer: Scorer, workdir: str, caption: Manifest, config: RunConfig) -> int:
    """Up to `eval.fid_samples` held-out images as the real set, batch by batch."""
    ev = config.eval
    images = islice(_held_out_images(workdir, caption, config), ev.fid_samples)
    while batch := list(islice(images, ev.batch_size)):
        scorer.add_real(torch.stack(batch))
    if scorer.num_real < 2:
        raise UserError(
            f"FID needs at least 2 held-out real images, found {scorer.num_real}. Raise "
            "eval.held_out_fraction or add data."
        )
    return scorer.num_real


def _held_out_images(workdir: str, caption: Manifest, config: RunConfig) -> Iterator[torch.Tensor]:
    fraction, resolution = config.eval.held_out_fraction, config.download.resolution
    for table in read_shards(workdir, caption, columns=["id", "image"]):
        for sample_id, data in zip(
            table["id"].to_pylist(), table["image"].to_pylist(), strict=True
        ):
            if is_held_out(sample_id, fraction):
                yield decode_image(data, resolution)
