"""What each training step reads: which samples (a pure function of seed, epoch and step) and how.

Resuming needs only the step: micro-batch `m` of process `rank` reads the sample positions
`[(m * world + rank) * B, ... + B)` of an endless stream made of one permutation per epoch. Each
epoch's permutation visits shards in random order and rows within a shard in random order (the
latent-data `ShardShuffleSampler`), so reads stay shard-local, and it is seeded by (seed, epoch),
never by how many batches an earlier, interrupted process happened to draw.

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
from sdflow.errors import UserError
from sdflow.families import get_family
from sdflow.latent_data import (
    CachedLatents,
    CaptionedImages,
    ShardShuffleSampler,
    caption_key,
    load_empty_prompts,
)
from sdflow.models import ComponentSources, encode_images, encode_prompts, load_component
from sdflow.stageio import Manifest


class EpochOrder:
    """The sample index at every stream position: epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, ranges: Sequence[range], seed: int):
        self.ranges = list(ranges)
        self.size = sum(len(r) for r in self.ranges)
        self.seed = seed
        self._epoch: tuple[int, Tensor] | None = None  # the permutation in use
        if self.size == 0:
            raise ValueError("no training samples")

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        return int(self.permutation(epoch)[offset])

    def permutation(self, epoch: int) -> Tensor:
        if self._epoch is None or self._epoch[0] != epoch:
            sampler = ShardShuffleSampler(self.ranges, seed=self.seed)
            sampler.set_epoch(epoch)
            self._epoch = (epoch, torch.tensor(list(sampler), dtype=torch.int64))
        return self._epoch[1]


class StepBatches(Sampler[list[int]]):
    """Micro-batches `start` .. `stop - 1` of one process, as lists of dataset indices."""

    def __init__(
        self,
        order: EpochOrder,
        batch_size: int,
        start: int,
        stop: int,
        world: int = 1,
        rank: int = 0,
    ):
        self.order = order
        self.batch_size = batch_size
        self.start = start
        self.stop = stop
        self.world = world
        self.rank = rank

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for micro in range(self.start, self.stop):
            first = (micro * self.world + self.rank) * self.batch_size
            yield [self.order.index(p) for p in range(first, first + self.batch_size)]


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

    def __init__(self, workdir: str, manifest: Manifest, captions: str = "text"):
        self.dataset = CachedLatents(workdir, manifest)
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

    def order(self, seed: int) -> EpochOrder:
        return EpochOrder(self.dataset.shard_ranges(), seed)

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
        self.empty_prompt = self.text({"caption": [""]})[0]

    def order(self, seed: int) -> EpochOrder:
        return EpochOrder(self.dataset.shard_ranges(), seed)

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
        return CachedBatches(workdir, upstream["latents"], caption_key(config.train))
    if not upstream.get("caption"):
        raise UserError("train.cache_latents is false but there is no caption stage output.")
    return EncodedBatches(config, upstream["caption"], workdir, sources, device, dtype)
