"""Shuffled tag captions (`train.caption_shuffle`, `train.keep_tokens`; issue 24 §3).

A tag-style caption (`1girl, red hair, smile, outdoors`) is split at its commas; every step, each
row's tags after the first `train.keep_tokens` are put in a new order and joined again with ", "
(kohya's `shuffle_caption`). The order is drawn from the step's generator right after the
timesteps (`objective.draw_inputs`: one `randperm` per row, in row order), so a resumed run draws
the same orders and a run without the shuffle draws exactly what it drew before.

The shuffled caption must be encoded at every step, so the train stage loads the family's
frozen text encoder(s) and `encode_captions` turns the captions into what the cache would have
held for them: the embeddings `text` (and `pooled`: SDXL, SD3, Flux), or, when the text encoder
trains (`train.text_encoder`), the token ids it runs on. The latents stage keeps each training
shard's captions beside it (`captions-XXXXX.json`, as for held-out shards). Caption dropout is
unchanged: a dropped row still gets the cached empty prompt. Why this and not N cached shuffles per
caption: docs/tags-and-masks.md.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from sdflow.config import RunConfig, TrainConfig
from sdflow.errors import UserError
from sdflow.models.families import Family, TextEncoders, family_of
from sdflow.training.latent_data import caption_key, captions_path


def split_tags(caption: str) -> list[str]:
    """A caption's comma-separated tags, stripped, empty ones left out."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def shuffle_tags(caption: str, keep: int, generator: torch.Generator) -> str:
    """The caption with its tags after the first `keep` in an order drawn from `generator`."""
    tags = split_tags(caption)
    head, tail = tags[:keep], tags[keep:]
    order = torch.randperm(len(tail), generator=generator).tolist()
    return ", ".join(head + [tail[i] for i in order])


def shuffle_captions(source: Any, batch: dict[str, Any], generator, train: TrainConfig) -> dict:
    """The batch with its captions shuffled and re-encoded (unchanged without caption_shuffle)."""
    if not train.caption_shuffle:
        return batch
    captions = [shuffle_tags(c, train.keep_tokens, generator) for c in batch["caption"]]
    encode = getattr(source, "encode_captions", None)  # EncodedBatches encodes `caption` itself
    return {**batch, "caption": captions, **(encode(captions) if encode else {})}


class CaptionedRows(Dataset):
    """The cached latents' rows with their captions (the shards' `captions-XXXXX.json`)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset
        self.captions: list[str] = []
        for path in dataset.paths:
            sidecar = captions_path(path)
            if not sidecar.is_file():
                raise UserError(
                    f"train.caption_shuffle is true but the latents shard {path} has no captions "
                    f"beside it ({sidecar.name}): rerun the latents stage with this config."
                )
            self.captions += json.loads(sidecar.read_text())

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], "caption": self.captions[index]}

    def buckets(self) -> list[str]:
        return self.dataset.buckets()


class CaptionEncoder:
    """Captions -> what the latents cache holds for them: the family's embeddings (`text`, and
    `pooled` where the family has one) from its frozen encoders, or `input_ids` (`key`) for a
    text encoder that trains (it runs on them in the step)."""

    def __init__(self, family: Family, text: TextEncoders, key: str):
        self.family, self.text, self.key = family, text, key

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> dict[str, Tensor]:
        if self.key == "input_ids":
            return {"input_ids": self.family.tokenize(self.text, captions)}
        encoded = self.family.encode_prompts(self.text, captions)
        return {key: value.float().cpu() for key, value in encoded.items()}


class ShuffledCaptions:
    """A cached batch source whose rows carry their captions and whose `encode_captions` encodes
    a step's shuffled captions as the latents stage would have cached them."""

    def __init__(self, source: Any, encode_captions: CaptionEncoder):
        self.source = source
        self.dataset = CaptionedRows(source.dataset)
        self.encode_captions = encode_captions

    def __getattr__(self, name: str) -> Any:  # everything else is the cached source's
        return getattr(self.__dict__["source"], name)


def with_caption_shuffle(config: RunConfig, source: Any, sources: Any, device, dtype) -> Any:
    """The train stage's batch source, wrapped for caption_shuffle when it reads the cache."""
    if not config.train.caption_shuffle or not hasattr(source, "captions"):
        return source  # off, or EncodedBatches (it encodes each step's captions itself)
    family = family_of(config)
    text = family.load_text(sources, config, dtype)
    for encoder in text.encoders:
        encoder.requires_grad_(False).eval().to(device)
    return ShuffledCaptions(source, CaptionEncoder(family, text, caption_key(config.train)))
