"""CLIP for the evaluate stage: a model/processor pair loaded offline, its embeddings, CLIP score.

`load_clip` loads a CLIPModel and its processor from a local directory or a cached hub name, adapted
to transformers 5 (whose `get_*_features` return output objects) and truncating long captions in the
tokenizer so each keeps its end-of-text token. `ClipEmbedder` embeds each generated image once; the
embeddings serve both CLIP score (image vs its prompt) and CMMD (generated vs real images).

CLIP score is torchmetrics' definition: 100 x the cosine of image and caption embeddings, averaged,
then clamped at 0 (`clip_score` reproduces `torchmetrics.multimodal.CLIPScore`, which the tests check).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchmetrics.functional.multimodal.clip_score import _get_features
from torchmetrics.multimodal.clip_score import CLIPScore

from sdflow.errors import UserError
from sdflow.models.hub import pinned


class _FeatureTensors(nn.Module):
    """CLIPModel whose get_*_features return tensors, as torchmetrics 1.9 expects.

    transformers 5 returns `BaseModelOutputWithPooling` (projected features in `pooler_output`).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _as_tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return _as_tensor(out)


def _as_tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _TruncatingProcessor:
    """Truncate long captions in the tokenizer, so each keeps its end-of-text token.

    torchmetrics cuts token ids after tokenising, which drops the EOS token CLIP pools from.
    """

    def __init__(self, processor, max_length: int):
        self.processor = processor
        self.max_length = max_length

    def __call__(self, *args, **kwargs):
        if kwargs.get("text") is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        return self.processor(*args, **kwargs)


def make_clip_score(clip_model: str) -> CLIPScore:
    """torchmetrics CLIPScore with our loader (it accepts only some hub names as strings)."""
    return CLIPScore(model_name_or_path=lambda: load_clip(clip_model))


def load_clip(clip_model: str):
    """(model, processor) for CLIP; a missing or unloadable model is a UserError."""
    from transformers import CLIPModel, CLIPProcessor

    local = Path(clip_model).expanduser()
    if _looks_local(clip_model) and not local.is_dir():
        raise UserError(f"eval.clip_model {clip_model!r} is not a directory.")
    source = str(local) if local.is_dir() else clip_model
    revision = pinned(source, None, not local.is_dir())  # a hub name: its main, as a commit
    try:
        model = CLIPModel.from_pretrained(source, **revision)
        processor = CLIPProcessor.from_pretrained(source, **revision)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"eval.clip_model {clip_model!r} could not be loaded ({exc}). Give a local directory "
            "holding a CLIPModel and its CLIPProcessor (save_pretrained), or unset eval.clip_model."
        ) from exc
    model.eval()
    max_length = model.config.text_config.max_position_embeddings
    return _FeatureTensors(model), _TruncatingProcessor(processor, max_length)


def _looks_local(name: str) -> bool:
    """A path rather than a hub name ("org/name")."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


class ClipEmbedder:
    """L2-normalised CLIP embeddings of images (uint8 NCHW) and of texts, on `device`."""

    def __init__(self, clip_model: str, device: torch.device | None = None):
        self.name = clip_model
        self.label = f"CLIP image embeddings ({clip_model})"
        self.device = device or torch.device("cpu")
        model, self.processor = load_clip(clip_model)
        self.model = model.to(self.device)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        return self._embed(list(images), "image")

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self._embed(list(texts), "text")

    def _embed(self, data: list, modality: str) -> torch.Tensor:
        with torch.no_grad():
            out = _get_features(data, modality, self.device, self.model, self.processor)
        out = out.double().cpu()
        return out / out.norm(dim=1, keepdim=True)


def clip_score(cosines: Sequence[float]) -> float:
    """torchmetrics' CLIP score of image-caption cosines: max(100 x their mean, 0)."""
    return max(100.0 * sum(cosines) / len(cosines), 0.0)
