"""Which format to store downloaded images in: size, encode / decode time, and what it does to latents.

    .venv/bin/python bench/image_format.py [--images 16]

Photo-like images (bench/download.py's generator, JPEG sources as on the web) are resized with the
download stage's own code (`sdflow.data.imaging`, center crop) to each resolution and stored as PNG,
WebP and JPEG at `download.quality` 95 with `sdflow.data.imaging.encode_image`. For each: mean bytes per
image, encode and decode milliseconds per image, and the effect on latents: each decoded image goes
through a small randomly initialised `AutoencoderKL` (seeded, 4 latent channels, /8 like SD's) and
the mean |latent - latent of the PNG| is printed relative to the PNG latents' standard deviation, with
the pixel error (mean |difference| on 0-255) beside it. A random VAE is not SD's: the latent column
says how much of the input change survives an encoder of this shape, not the loss in training. As a
yardstick, the `lanczos` row is lossless PNG of the same images resized with Lanczos instead of the
stage's bicubic filter: a change nobody would call a loss of training data.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from download import make_jpeg  # noqa: E402

from sdflow.data.imaging import encode_image, resize_image  # noqa: E402

FORMATS = ("png", "webp", "jpeg")
RESOLUTIONS = (32, 64, 512)


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    blocks = ("DownEncoderBlock2D",) * 4
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
        down_block_types=blocks, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8,
    ).eval()  # fmt: skip


def latents(vae: AutoencoderKL, image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    with torch.no_grad():
        return vae.encode(pixels[None]).latent_dist.mean[0]


def measure(count: int) -> list[dict]:
    vae = tiny_vae()
    sources = [Image.open(io.BytesIO(make_jpeg(i))).convert("RGB") for i in range(count)]
    rows = []
    for resolution in RESOLUTIONS:
        resized = [resize_image(image, resolution, "center_crop") for image in sources]
        reference = [latents(vae, image) for image in resized]
        spread = torch.stack(reference).std().item()
        for fmt in FORMATS:
            encode_image(resized[0], fmt, 95)  # warm-up: the first WebP call loads the codec
            started = time.perf_counter()
            encoded = [encode_image(image, fmt, 95) for image in resized]
            encode_ms = (time.perf_counter() - started) * 1000 / count
            started = time.perf_counter()
            decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in encoded]
            decode_ms = (time.perf_counter() - started) * 1000 / count
            pixel_error, latent_error = errors(vae, decoded, resized, reference, spread)
            rows.append(
                {"px": resolution, "format": fmt,
                 "kib": round(statistics.mean(map(len, encoded)) / 1024, 2),
                 "encode_ms": round(encode_ms, 3), "decode_ms": round(decode_ms, 3),
                 "pixel_mae": round(pixel_error, 3), "latent_rel_mae": round(latent_error, 5)}
            )  # fmt: skip
        rows.append(yardstick(vae, sources, resized, reference, resolution, spread))
    return rows


def yardstick(vae, sources, resized, reference, resolution: int, spread: float) -> dict:
    """The same rows resized with Lanczos instead of bicubic (lossless): a harmless change."""
    other = [_lanczos(image, resolution) for image in sources]
    pixel_error, latent_error = errors(vae, other, resized, reference, spread)
    return {"px": resolution, "format": "lanczos", "kib": "", "encode_ms": "", "decode_ms": "",
            "pixel_mae": round(pixel_error, 3), "latent_rel_mae": round(latent_error, 5)}  # fmt: skip


def errors(vae, images, resized, reference, spread: float) -> tuple[float, float]:
    """(mean absolute pixel error of `images` against `resized`, mean absolute latent error against
    `reference` relative to the latents' spread)."""
    pixel = statistics.mean(
        float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())
        for a, b in zip(images, resized, strict=True)
    )
    latent = statistics.mean(
        (latents(vae, image) - ref).abs().mean().item() / spread
        for image, ref in zip(images, reference, strict=True)
    )
    return pixel, latent


def _lanczos(image: Image.Image, resolution: int) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    box = (left, top, left + side, top + side)
    return image.resize(
        (resolution, resolution), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = measure(args.images)
    print("| px | format | KiB/image | encode ms | decode ms | pixel MAE | latent MAE / std |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['px']} | {r['format']} | {r['kib']} | {r['encode_ms']} | {r['decode_ms']} "
              f"| {r['pixel_mae']} | {r['latent_rel_mae']} |")  # fmt: skip


if __name__ == "__main__":
    main()
