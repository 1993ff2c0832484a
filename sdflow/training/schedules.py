"""What each training step reads: which samples (a pure function of seed, epoch and step) and how.

Resuming needs only the step: micro-batch `m` of process `rank` is batch `m * world + rank` of an
endless stream made of one list of batches per epoch. Epoch e's list is seeded by (seed, e), never by
how many batches an earlier, interrupted process happened to draw: one permutation of all samples
(a global shuffle across shards and buckets, so a folder sorted by class does not train in long
single-class runs), cut per bucket into batches of `batch_size` in that order, the batches then
shuffled. Every batch holds one bucket (one latent shape); a bucket whose count is not a multiple
of the batch size ends in one smaller batch per epoch (nothing is dropped; `EpochOrder.summary`
reports it).

A batch source turns collated rows into latent distributions and text embeddings: `CachedBatches`
reads the latents stage's cache; `EncodedBatches` runs the VAE and text encoder on every batch
(`train.cache_latents: false`, to measure what the cache saves).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import Tensor
from torch.utils.data import Sampler
from transformers import CLIPTextModel, CLIPTokenizer

from sdflow.config import RunConfig
from sdflow.config.subsets import subset_plan
from sdflow.errors import UserError
from sdflow.models.components import ComponentSources, encode_images, encode_prompts, load_component
from sdflow.models.families import get_family
from sdflow.store.stageio import Manifest
from sdflow.training.latent_data import (
    CachedLatents,
    CaptionedImages,
    caption_key,
    load_empty_prompts,
)


class EpochOrder:
    """The batches of every epoch: epoch e's are a pure function of (seed, e); one bucket each."""

    def __init__(
        self,
        buckets: Sequence[str],
        batch_size: int,
        seed: int,
        repeats: Sequence[int] | None = None,
    ):
        if not buckets:
            raise ValueError("no training samples")
        self.names = sorted(set(buckets))
        number = {name: i for i, name in enumerate(self.names)}
        # `repeats[i]` copies of sample i per epoch (`subsets`' repeats): entries of the permutation
        self.rows = repeated_rows(len(buckets), repeats)
        self.bucket_of = torch.tensor([number[b] for b in buckets], dtype=torch.int64)[self.rows]
        self.counts = torch.bincount(self.bucket_of, minlength=len(self.names)).tolist()
        self.batch_size = batch_size
        self.per_epoch = sum(-(-n // batch_size) for n in self.counts)
        self.seed = seed
        self._epoch: tuple[int, list[list[int]]] | None = None  # the batches in use

    def batch(self, index: int) -> list[int]:
        """Batch `index` of the endless stream (dataset indices)."""
        epoch, offset = divmod(index, self.per_epoch)
        return self.batches(epoch)[offset]

    def batches(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.bucket_of), generator=generator)
            size, batches = self.batch_size, []
            for bucket in range(len(self.names)):
                rows = self.rows[order[self.bucket_of[order] == bucket]].tolist()
                batches += [rows[a : a + size] for a in range(0, len(rows), size)]
            shuffled = torch.randperm(len(batches), generator=generator).tolist()
            self._epoch = (epoch, [batches[i] for i in shuffled])
        return self._epoch[1]

    def summary(self) -> dict[str, dict[str, int]]:
        return bucket_plan(
            {n.lstrip("@") or "square": c for n, c in zip(self.names, self.counts, strict=True)},
            self.batch_size,
        )


def repeated_rows(count: int, repeats: Sequence[int] | None) -> Tensor:
    """Row indices 0 .. count - 1, each `repeats[i]` times (once each without repeats)."""
    rows = torch.arange(count)
    return rows if repeats is None else torch.repeat_interleave(rows, torch.tensor(repeats))


def bucket_plan(counts: dict[str, int], batch_size: int) -> dict[str, dict[str, int]]:
    """Per bucket: samples, batches per epoch, and the size of its smaller last batch (0: none)."""
    return {
        name: {"samples": n, "batches": -(-n // batch_size), "smaller_batch": n % batch_size}
        for name, n in counts.items()
    }


def log_bucket_plan(plan: dict[str, dict[str, int]], batch_size: int, log) -> None:
    """One line per bucket with a smaller batch (kept, not dropped), a summary line otherwise."""
    for name, entry in plan.items():
        if entry["smaller_batch"]:
            log.info(
                "bucket %s: %d samples, %d batches per epoch, the last of %d (train.batch_size %d)",
                name,
                entry["samples"],
                entry["batches"],
                entry["smaller_batch"],
                batch_size,
            )
    log.info("buckets: %s", {name: entry["samples"] for name, entry in plan.items()})


class StepBatches(Sampler[list[int]]):
    """Micro-batches `start` .. `stop - 1` of one process, as lists of dataset indices."""

    def __init__(self, order: EpochOrder, start: int, stop: int, world: int = 1, rank: int = 0):
        self.order = order
        self.start = start
        self.stop = stop
        self.world = world
        self.rank = rank

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for micro in range(self.start, self.stop):
            yield self.order.batch(micro * self.world + self.rank)

    def samples(self, first: int, count: int) -> int:
        """Samples in micro-batches `first` .. `first + count - 1` of every process: what one
        optimizer step sees (a bucket's last batch of an epoch may be smaller than the rest)."""
        stream = range(first * self.world, (first + count) * self.world)
        return sum(len(self.order.batch(index)) for index in stream)


def same_shape(tensors: list[Tensor]) -> list[list[int]]:
    """Indices of the tensors grouped by shape, groups in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, tensor in enumerate(tensors):
        groups.setdefault(tuple(tensor.shape), []).append(i)
    return list(groups.values())


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, list other values; a key that is None for any row is None for the batch."""
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if any(v is None for v in values):
            batch[key] = None
        elif isinstance(values[0], Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


# ---------------------------------------------------------------------------------- batch sources


class CachedBatches:
    """Latent distributions and text embeddings cached by the latents stage (the fast path), or
    with `captions="input_ids"` (a trained text encoder) the captions' token ids."""

    def __init__(self, workdir: str, manifest: Manifest, captions: str = "text", plan=None):
        self.dataset = CachedLatents(workdir, manifest)
        self.plan = plan  # `subsets`: repeats or weights per subset (sdflow.training.subsets)
        if len(self.dataset) == 0:
            raise UserError("The latents stage cached no training samples: nothing to train on.")
        cached = manifest["info"].get("captions", "text")
        if cached != captions:
            raise UserError(
                f"The latents stage {manifest.get('path')} cached caption {cached!r} but this run "
                f"needs {captions!r} (train.text_encoder): rerun the latents stage with this config."
            )
        self.captions = captions
        empty = load_empty_prompts(workdir, manifest)
        self.empty_prompt = empty[captions].float() if captions == "text" else empty[captions]
        self.empty_pooled = empty["pooled"].float() if "pooled" in empty else None
        self.info = manifest["info"]
        self.scaling_factor = float(self.info["scaling_factor"])
        self.shift_factor = float(self.info.get("shift_factor") or 0.0)  # SD3, Flux: the VAE's

    def order(self, seed: int, batch_size: int) -> EpochOrder:
        if self.plan is not None:
            from sdflow.training.subsets import subset_order  # it imports this module

            return subset_order(self.dataset, batch_size, seed, self.plan)
        return EpochOrder(self.dataset.buckets(), batch_size, seed)

    def latent_dist(self, batch: dict[str, Any], flip: Tensor) -> tuple[Tensor, Tensor]:
        if batch["mean_flip"] is None:  # flips were not cached (latents.flip: false)
            return batch["mean"], batch["std"]
        chosen = flip[:, None, None, None]
        mean = torch.where(chosen, batch["mean_flip"], batch["mean"])
        return mean, torch.where(chosen, batch["std_flip"], batch["std"])

    def text(self, batch: dict[str, Any]) -> Tensor:
        """Embeddings [B, L, D] (float32), or token ids [B, L] for a trained text encoder."""
        if self.captions == "input_ids":
            return batch["input_ids"]
        return batch["text"].float()

    def added_conditioning(self, batch: dict[str, Any], drop: Tensor) -> dict[str, Tensor] | None:
        """The family's added UNet conditioning (SDXL: pooled projection, the empty prompt's where
        the caption is dropped, and size/crop time ids); None for SD."""
        pooled = batch.get("pooled")
        if pooled is not None:
            pooled = torch.where(drop[:, None], self.empty_pooled, pooled.float())
        return added_conditioning(self.info, batch, pooled)


def added_conditioning(info: dict, batch: dict[str, Any], pooled: Tensor | None):
    """The UNet's added conditioning of cached rows, by the family the latents stage recorded
    in its manifest's `info` (SD: None)."""
    family = get_family(info.get("family", "sd"))
    return family.added_conditioning(batch, pooled, tuple(batch["mean"].shape[-2:]), info)


class EncodedBatches:
    """Images and captions encoded at every step (`train.cache_latents: false`), for comparison."""

    def __init__(self, config, manifest, workdir, sources: ComponentSources, device, dtype):
        model = config.model
        self.dataset = CaptionedImages(
            workdir, manifest, config.download.resolution, config.eval.held_out_fraction
        )
        if len(self.dataset) == 0:
            raise UserError("The caption stage has no training samples: nothing to train on.")
        self.vae = load_component(sources.vae, sources.vae_subfolder, AutoencoderKL, model, dtype)
        self.vae.to(device).requires_grad_(False).eval()
        self.tokenizer = load_component(
            sources.tokenizer, sources.tokenizer_subfolder, CLIPTokenizer, model
        )
        self.text_encoder = load_component(
            sources.text_encoder, sources.text_encoder_subfolder, CLIPTextModel, model, dtype
        )
        self.text_encoder.to(device).requires_grad_(False).eval()
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.empty_prompt = self.text({"caption": [""]})[0]

    def order(self, seed: int, batch_size: int) -> EpochOrder:
        return EpochOrder([""] * len(self.dataset), batch_size, seed)

    @torch.no_grad()
    def latent_dist(self, batch: dict[str, Any], flip: Tensor) -> tuple[Tensor, Tensor]:
        pixels = batch["pixels"]
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        mean, std = encode_images(self.vae, pixels)
        return mean.float().cpu(), std.float().cpu()

    @torch.no_grad()
    def text(self, batch: dict[str, Any]) -> Tensor:
        return encode_prompts(self.tokenizer, self.text_encoder, batch["caption"]).float().cpu()

    def added_conditioning(self, batch: dict[str, Any], drop: Tensor) -> None:
        return None  # SD only (an SDXL run refuses train.cache_latents: false)


def make_batches(
    config: RunConfig,
    upstream: dict[str, Manifest | None],
    workdir: str,
    sources: ComponentSources,
    device: torch.device,
    dtype: torch.dtype,
) -> CachedBatches | EncodedBatches:
    """The cached latents, or (`train.cache_latents: false`) the caption stage's images."""
    if config.train.cache_latents:
        plan = subset_plan(config)
        return CachedBatches(workdir, upstream["latents"], caption_key(config.train), plan)
    if not upstream.get("caption"):
        raise UserError("train.cache_latents is false but there is no caption stage output.")
    return EncodedBatches(config, upstream["caption"], workdir, sources, device, dtype)
