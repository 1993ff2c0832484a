"""BLIP / BLIP-2 captions through transformers, a batch of images per `generate` call.

`caption.backend: blip` (e.g. `sdflow run laion-blip-caption --only download,filter,caption`).
`caption.model` is a hub name (`Salesforce/blip-image-captioning-large`) or a local directory
holding the model and its processor; its `config.json` decides between BLIP and BLIP-2. Weights
load in `caption.dtype` (float16 on a GPU by default); decoding is greedy or beam search
(`caption.num_beams`) up to `caption.max_new_tokens`, optionally continuing `caption.prompt`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from PIL import Image
from transformers import (
    AutoConfig,
    AutoProcessor,
    Blip2ForConditionalGeneration,
    BlipForConditionalGeneration,
)

from sdflow.config import CaptionConfig
from sdflow.data.captioners import select_device, select_dtype
from sdflow.errors import UserError
from sdflow.models.components import absolute_source, is_hub_name
from sdflow.models.hub import pinned

MODEL_CLASSES = {"blip": BlipForConditionalGeneration, "blip-2": Blip2ForConditionalGeneration}


class BlipCaptioner:
    """Captions every image of a batch with one `generate` call; ignores source captions."""

    needs_images = True

    def __init__(self, cfg: CaptionConfig, cache_dir: Path | None = None):
        self.cfg = cfg
        device = select_device()
        self.model, self.processor = load_blip(cfg, device, select_dtype(cfg.dtype, device))

    def caption(
        self, images: list[Image.Image] | None, existing: list[str | None]
    ) -> list[str | None]:
        return generate_captions(self.model, self.processor, images or [], self.cfg)


def load_blip(cfg: CaptionConfig, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """The caption model (eval mode, on `device` in `dtype`) and its processor."""
    source = absolute_source(cfg.model)
    kwargs = pinned(source, cfg.revision, is_hub_name(source))
    if not is_hub_name(source) and not Path(source).is_dir():
        raise UserError(
            f"caption.model {cfg.model!r} is not a directory. Give a local BLIP / BLIP-2 model "
            "directory (saved with its processor) or a hub name such as "
            "Salesforce/blip-image-captioning-large."
        )
    try:
        model_type = AutoConfig.from_pretrained(source, **kwargs).model_type
        if model_type not in MODEL_CLASSES:
            raise UserError(
                f"caption.model {cfg.model!r} is a {model_type!r} model; the caption backends "
                f"generate with BLIP or BLIP-2 ({', '.join(MODEL_CLASSES)})."
            )
        model = MODEL_CLASSES[model_type].from_pretrained(source, dtype=dtype, **kwargs)
        processor = AutoProcessor.from_pretrained(source, **kwargs)
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise UserError(
            f"caption.model {cfg.model!r}: the hub has no such model or revision "
            f"({type(exc).__name__})."
        ) from None
    except (OSError, ValueError) as exc:
        if is_hub_name(source):
            raise  # network trouble, worth a retry
        raise UserError(f"Could not load caption.model from {source}: {exc}") from None
    return model.to(device).eval(), processor


@torch.inference_mode()
def generate_captions(
    model: Any, processor: Any, images: list[Image.Image], cfg: CaptionConfig
) -> list[str | None]:
    """One caption per image (None where the model produced only special tokens)."""
    if not images:
        return []
    text = [cfg.prompt] * len(images) if cfg.prompt else None
    inputs = processor(images=images, text=text, return_tensors="pt")
    inputs = {name: _to_model(value, model) for name, value in inputs.items()}
    ids = model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams)
    texts = processor.batch_decode(ids, skip_special_tokens=True)
    return [" ".join(t.split()) or None for t in texts]


def _to_model(value: torch.Tensor, model: Any) -> torch.Tensor:
    """Onto the model's device; pixel values also in its dtype (token ids stay integers)."""
    if value.is_floating_point():
        return value.to(device=model.device, dtype=model.dtype)
    return value.to(device=model.device)
