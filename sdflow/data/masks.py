"""Loss masks in the download stage (`train.masked_loss`; issue 24 §4).

With masked loss on, the download stage stores each image's mask beside it (the `mask` column of
its shards: a greyscale PNG, or null where the image has none and every pixel counts). The mask
is the folder source's `NAME.mask.png` beside the image, else the image's own alpha channel. It is
turned upright with the image (EXIF), must then have the image's size, and is resized with exactly
the image's geometry (`imaging.resize_image`: the same box and size, bicubic); the image is
decoded at full size for that (no JPEG draft decoding), so both start from the same pixel grid.
Later stages crop it with its image (`sdflow.training.masks.bucket_mask`).

A mask that cannot be decoded fails its image's row (`undecodable_mask`). A folder's mask files of
another size than their image stop the run before any work (`mask_size_mismatches`, run by `sdflow
run` / `sdflow check`: image headers only); where a size is only known once both are read (the
alpha channel, a source not checked up front) such a mask fails its image's row (`mask_size`, both
sizes in the detail).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import replace
from pathlib import Path

from PIL import Image, ImageOps

from sdflow.data.imaging import (
    Encoded,
    ImageSpec,
    Rejected,
    decode_image,
    encode_image,
    resize_image,
)


def process_masked(
    data: bytes, mask: bytes | None, spec: ImageSpec
) -> tuple[Encoded, bytes | None]:
    """`imaging.process_image` with the image's mask (`mask`: a mask file's bytes; None: the
    image's alpha channel, if it has one) resized alike: (the encoded image, the mask's PNG or
    None when there is no mask). Raises `Rejected`."""
    if not data:
        raise Rejected("empty_body", "zero bytes")
    content_hash = hashlib.sha256(data).hexdigest()
    image, orig_size = decode_image(data, replace(spec, resize_mode="none"))  # no draft
    resized = resize_image(image, spec.resolution, spec.resize_mode)
    encoded = encode_image(resized, spec.image_format, spec.quality)
    stored = Encoded(encoded, resized.width, resized.height, *orig_size, content_hash)
    layer = read_mask(mask) if mask is not None else alpha_of(data)
    if layer is None:
        return stored, None
    if layer.size != image.size:
        raise Rejected(
            "mask_size",
            f"mask {layer.width}x{layer.height} but image {image.width}x{image.height} (upright)",
        )
    return stored, encode_image(resize_image(layer, spec.resolution, spec.resize_mode), "png")


UPRIGHT_SWAPS = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file as `ImageOps.exif_transpose` turns it, from its header."""
    with Image.open(path) as image:
        width, height = image.size
        turned = image.getexif().get(0x0112) in UPRIGHT_SWAPS
    return (height, width) if turned else (width, height)


def mask_size_mismatches(pairs: list[tuple[Path, Path]]) -> list[str]:
    """'image: mask WxH, image WxH' for each (image, mask file) pair whose upright sizes differ."""
    found = []
    for image, mask in pairs:
        try:
            sizes = upright_size(mask), upright_size(image)
        except OSError:  # unreadable: the download stage fails that row with its reason
            continue
        if sizes[0] != sizes[1]:
            (mw, mh), (iw, ih) = sizes
            found.append(f"{image.name}: mask {mw}x{mh}, image {iw}x{ih}")
    return found


def read_mask(data: bytes) -> Image.Image:
    """A mask file as an upright greyscale image (white: counts); `undecodable_mask` else."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            return ImageOps.exif_transpose(opened).convert("L")
    except Exception as exc:  # Pillow raises almost anything on a broken file
        raise Rejected("undecodable_mask", f"{type(exc).__name__}: {exc}") from None


def alpha_of(data: bytes) -> Image.Image | None:
    """The image's alpha channel, upright, or None when it has none (the image decoded already)."""
    with Image.open(io.BytesIO(data)) as opened:
        if opened.mode not in ("RGBA", "LA", "PA") and "transparency" not in opened.info:
            return None
        opened.load()
        upright = ImageOps.exif_transpose(opened)
        return upright.convert("RGBA").getchannel("A")
