"""Encoding samples into the latents cache's rows: the image cropped to its bucket and encoded by the
VAE (latent mean/std, and of the flipped image), the caption by the family's text encoders (or its
token ids when the text encoder trains), each stored in `latents.dtype`.

The latents stage (`tasks.latents`) decides which rows to encode and writes the shards; this module
is what one batch of rows becomes. A sample that cannot be decoded, or whose encoding is not finite,
becomes a failure row with its reason (`undecodable_image`, `non_finite_latent`); a half-precision
VAE that overflows is retried in float32 before any row is given up.
"""

from __future__ import annotations

import io
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch import Tensor

from sdflow.config import RunConfig
from sdflow.data.buckets import Bucket, bucket_name, bucket_pixels, nearest_bucket
from sdflow.errors import UserError
from sdflow.models.components import encode_images
from sdflow.models.families import Family, TextEncoders
from sdflow.store.reuse import Outcome
from sdflow.training.latent_data import caption_key
from sdflow.training.masks import MaskError, bucket_mask, latent_mask
from sdflow.training.schedules import same_shape

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Encoders:
    """The frozen models that turn a sample into its cached row."""

    vae: AutoencoderKL
    text: TextEncoders
    family: Family
    device: torch.device
    buckets: list[Bucket]  # the bucket set (one square bucket with `latents.buckets: none`)


def check_patching(config: RunConfig, buckets: list[Bucket], vae: AutoencoderKL, family) -> None:
    """Every bucket's latent sides must be multiples of what the denoiser patches (`sd3`: its
    2x2 patches, `flux`: its 2x2 packing; 1 for a UNet): refused before any encoding."""
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    multiple = scale * family.latent_multiple
    bad = [b for b in buckets if b[0] % multiple or b[1] % multiple]
    if bad:
        key = "download.resolution" if config.latents.buckets == "none" else "latents.buckets"
        raise UserError(
            f"{key} gives image sizes {bad[:3]} that the {family.name} denoiser cannot patch: "
            f"both sides must be multiples of {multiple} px (the VAE's {scale} x the "
            f"{family.latent_multiple}x{family.latent_multiple} patches); use a step or "
            f"resolution that is a multiple of {multiple}."
        )


def encode_captions(
    config: RunConfig, encoders: Encoders, captions: list[str]
) -> dict[str, Tensor]:
    """The family's cached conditioning ({"text": embeddings [B, L, D]}, SDXL also "pooled"), or
    {"input_ids": [B, L]} when the run trains the encoder."""
    if caption_key(config.train) == "input_ids":
        return {"input_ids": encoders.family.tokenize(encoders.text, captions)}
    with torch.no_grad():
        encoded = encoders.family.encode_prompts(encoders.text, captions)
    return {key: value.float() for key, value in encoded.items()}


def encode_rows(config: RunConfig, encoders: Encoders, samples: list[dict]) -> list[Outcome]:
    """Each sample's outcome, in order: its stored tensors (one row each), or its failure."""
    results: dict[str, Outcome] = {}
    size = config.latents.batch_size
    dtypes = {"text": encoders.family.text_cache_dtype(config)}
    for batch in (samples[a : a + size] for a in range(0, len(samples), size)):
        kept, failed = encode_batch(config, encoders, batch)
        for row in kept:
            kept_row = {
                k: v if k == "id" else to_stored(v, config, dtypes.get(k)) for k, v in row.items()
            }
            results[row["id"]] = Outcome(True, kept_row)
        results |= {failure["id"]: Outcome(False, failure) for failure in failed}
    return [results[s["id"]] for s in samples]


def bucket_of(row: dict[str, Any], buckets: list[Bucket]) -> str:
    """A row's bucket name (the one bucket when there are no others)."""
    bucket = tuple(row["bucket"][0].tolist()) if "bucket" in row else buckets[0]
    return bucket_name(bucket)


def encode_batch(
    config: RunConfig, encoders: Encoders, batch: list[dict]
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Decode, encode and check one batch: (kept rows {id, tensor name: one-row tensor},
    failure rows). Images of one bucket are encoded together."""
    kept, pixels, failures = [], [], []
    for sample in batch:
        try:
            image, row = crop_to_bucket(sample, encoders.buckets)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            reason = "bad_mask" if isinstance(exc, MaskError) else "undecodable_image"
            failures.append(failure_row(sample, reason, exc))
            continue
        kept.append(row)
        pixels.append(image)
    if not kept:
        return [], failures
    for members in same_shape(pixels):
        with torch.no_grad():
            views = encode_pixels(config, encoders, torch.stack([pixels[i] for i in members]))
        for j, i in enumerate(members):
            kept[i] |= {key: value[j : j + 1] for key, value in views.items()}
    scale = 2 ** (len(encoders.vae.config.block_out_channels) - 1)
    for row in kept:
        if "mask" in row:  # train.masked_loss: at latent size, beside the latent
            row["mask"] = latent_mask(row["mask"], scale)
    texts = encode_captions(config, encoders, [sample.pop("caption") for sample in kept])
    for i, row in enumerate(kept):
        row |= {key: value[i : i + 1] for key, value in texts.items()}
    finite = [
        all(t.isfinite().all() for t in row.values() if isinstance(t, Tensor)) for row in kept
    ]
    samples = {s["id"]: s for s in batch}
    failures += [
        failure_row(samples[row["id"]], "non_finite_latent", "NaN or inf in the encoding")
        for row, ok in zip(kept, finite, strict=True)
        if not ok
    ]
    return [row for row, ok in zip(kept, finite, strict=True) if ok], failures


def crop_to_bucket(sample: dict, buckets: list[Bucket]) -> tuple[Tensor, dict[str, Any]]:
    """The sample's pixels at its bucket, and its row so far: id, caption, `original_size`
    [1, 2] (height, width before the download resized it), `crop_top_left` [1, 2] (top, left of the
    crop in the image resized to cover the bucket) and, with buckets, `bucket` [1, 2] (width,
    height)."""
    with Image.open(io.BytesIO(sample["image"])) as image:
        width, height = image.size
    original = (sample.get("orig_height") or height, sample.get("orig_width") or width)
    bucket = nearest_bucket(width, height, buckets)
    pixels, top_left = bucket_pixels(sample["image"], bucket)
    row = {
        "id": sample["id"],
        "caption": sample["caption"] or "",
        "original_size": torch.tensor([original], dtype=torch.int64),
        "crop_top_left": torch.tensor([top_left], dtype=torch.int64),
    }
    if len(buckets) > 1:
        row["bucket"] = torch.tensor([bucket], dtype=torch.int64)
    if "mask" in sample:  # train.masked_loss: the mask cropped exactly as its image
        row["mask"] = bucket_mask(sample["mask"], (width, height), bucket)
    return pixels, row


def encode_pixels(config: RunConfig, encoders: Encoders, pixels: Tensor) -> dict[str, Tensor]:
    """Latent mean/std (and of the flipped image) under the configured autocast.

    A half-precision VAE can overflow to NaN (a known SDXL fp16 VAE problem): such a batch is
    encoded again in float32 before any row is given up.
    """
    precision = vae_precision(config, encoders)
    out = encode_views(config, encoders, pixels, precision)
    if precision is not None and not all(t.isfinite().all() for t in out.values()):
        out = encode_views(config, encoders, pixels, None)
    return out


def vae_precision(config: RunConfig, encoders: Encoders) -> torch.dtype | None:
    """`latents.mixed_precision`'s autocast dtype, but float32 (None) for fp16 when the family
    honours the VAE's `force_upcast` flag and the VAE sets it (SDXL's VAE overflows in fp16;
    an fp16-safe replacement VAE, `model.vae`, clears the flag)."""
    precision = AUTOCAST.get(config.latents.mixed_precision)
    upcast = encoders.family.upcast_vae and getattr(encoders.vae.config, "force_upcast", False)
    return None if precision is torch.float16 and upcast else precision


def encode_views(
    config: RunConfig, encoders: Encoders, pixels: Tensor, precision: torch.dtype | None
) -> dict[str, Tensor]:
    device = encoders.device
    layout = torch.channels_last if config.latents.channels_last else torch.contiguous_format
    autocast = torch.autocast(device.type, dtype=precision) if precision else nullcontext()
    with autocast:
        mean, std = encode_images(encoders.vae, pixels.to(device, memory_format=layout))
        out = {"mean": mean.float(), "std": std.float()}
        if config.latents.flip:
            flipped = torch.flip(pixels, dims=[-1]).to(device, memory_format=layout)
            mean, std = encode_images(encoders.vae, flipped)
            out |= {"mean_flip": mean.float(), "std_flip": std.float()}
    return out


def to_stored(tensor: Tensor, config: RunConfig, dtype: torch.dtype | None = None) -> Tensor:
    """Floats in `dtype` (the family's choice for its caption states: `text_cache_dtype`) or
    `latents.dtype`; token ids as they are."""
    if not tensor.is_floating_point():
        return tensor.detach().cpu()
    return tensor.detach().to("cpu", dtype or DTYPES[config.latents.dtype])


def failure_row(sample: dict, reason: str, detail: object) -> dict[str, str]:
    return {
        "id": sample["id"],
        "source": sample.get("source") or "",
        "reason": reason,
        "detail": str(detail)[:300],
    }
