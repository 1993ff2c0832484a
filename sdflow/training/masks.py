"""Masked loss (`train.masked_loss`; issue 24 §4): the loss counts only where a mask says.

The latents stage caches each row's mask beside its latent (`mask` [1, h, w] in [0, 1], at latent
size: the image's mask cropped with it to its bucket, then averaged over each latent pixel's
VAE-scale square; see `sdflow.training.encoding`). A step flips a row's mask where it reads the
flipped latents, and `per_sample_mse` weights each element's squared error by the mask and
normalises per sample by the mask's weight: sum(m x e) / sum(m) over channels and pixels. A
sample's loss is then the mean error over its masked area, whatever that area's size (kohya's
`apply_masked_loss` multiplies and takes the plain mean, so a sample with a small mask counts
less; see docs/tags-and-masks.md). A sample with an empty mask contributes 0.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sdflow.data.imaging import cover_crop


def loss_mask(batch: dict[str, Any], flip: Tensor) -> Tensor | None:
    """The batch's masks [B, 1, h, w] (float), flipped where the row reads flipped latents; None
    when the cache holds no masks."""
    mask = batch.get("mask")
    if mask is None:
        return None
    if batch.get("mean_flip") is None:  # no flipped latents cached: nothing is flipped
        return mask.float()
    return torch.where(flip[:, None, None, None], mask.flip(-1), mask).float()


def per_sample_mse(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """[B] mean squared error per sample; with a mask [B, 1, h, w] its weighted mean."""
    error = F.mse_loss(pred, target, reduction="none")
    if mask is None:
        return error.flatten(1).mean(dim=1)
    weights = mask.to(error.device, error.dtype).expand_as(error)
    total = weights.flatten(1).sum(dim=1)
    return (error * weights).flatten(1).sum(dim=1) / total.clamp_min(torch.finfo(total.dtype).tiny)


# ------------------------------------------------------------------------- the cached masks


class MaskError(ValueError):
    """A stored mask that does not fit its image (its row fails with reason `bad_mask`)."""


def bucket_mask(data: bytes | None, image_size: tuple[int, int], bucket: tuple[int, int]) -> Tensor:
    """The stored mask (PNG bytes at the stored image's size; None: the whole image counts)
    resized and cropped to `bucket` exactly as its image (`cover_crop`): [1, height, width] in
    [0, 1]."""
    width, height = bucket
    if data is None:
        return torch.ones(1, height, width)
    with Image.open(io.BytesIO(data)) as image:
        if image.size != image_size:
            raise MaskError(f"mask of {image.size} beside an image of {image_size}")
        cropped, _ = cover_crop(image.convert("L"), width, height)
        array = np.asarray(cropped, dtype=np.float32)
    return torch.from_numpy(array)[None] / 255.0


def latent_mask(mask: Tensor, scale: int) -> Tensor:
    """[1, H, W] pixel mask -> [1, 1, H / scale, W / scale]: the mean over each latent pixel's
    scale x scale square of pixels (what the VAE folds into it)."""
    return F.avg_pool2d(mask[None], scale)
