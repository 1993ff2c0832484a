"""Decode, resize and re-encode one image: the CPU-heavy part of the download stage.

`process_image` runs in worker threads (Pillow releases the GIL while it decodes, resamples and
encodes), never on the network event loop. Every way an image can be unusable becomes a `Rejected`
with a short reason that ends up in the stage's failures table. Only the formats a training set
needs are parsed (`ALLOWED_FORMATS`; never EPS, which would run Ghostscript, or the other plugins),
and an image whose header declares more than `ImageSpec.max_pixels` pixels is refused before its
pixels are decoded (Pillow's own decompression-bomb limit stays on as well; nothing silences it).
"""

from __future__ import annotations

import hashlib
import io
import math
import zlib
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageOps, UnidentifiedImageError

ResizeMode = Literal["center_crop", "keep_ratio", "max_area", "none"]
ImageFormat = Literal["jpeg", "png", "webp"]

# Orientations 5-8 swap width and height (https://exiftool.org/TagNames/EXIF.html, tag 0x0112).
_TRANSPOSED = {5, 6, 7, 8}
_ORIENTATION_TAG = 0x0112
_PIL_FORMAT = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # Pillow's default: it warns above, fails at 2x


class Rejected(Exception):
    """A sample that cannot be used; `reason` is a short failure code such as `decode_error`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageSpec:
    """What every stored image looks like (from the download config)."""

    resolution: int
    resize_mode: ResizeMode = "center_crop"
    image_format: ImageFormat = "png"
    quality: int = 95
    max_pixels: int = MAX_PIXELS


@dataclass(frozen=True)
class Encoded:
    """A stored image plus the facts later stages filter on."""

    data: bytes
    width: int
    height: int
    orig_width: int
    orig_height: int
    content_hash: str


def process_image(data: bytes, spec: ImageSpec) -> Encoded:
    """Hash the original bytes, decode, orient, resize per `spec` and encode; raises `Rejected`."""
    if not data:
        raise Rejected("empty_body", "zero bytes")
    content_hash = hashlib.sha256(data).hexdigest()
    image, orig_size = decode_image(data, spec)
    resized = resize_image(image, spec.resolution, spec.resize_mode)
    encoded = encode_image(resized, spec.image_format, spec.quality)
    return Encoded(encoded, resized.width, resized.height, *orig_size, content_hash)


def decode_image(data: bytes, spec: ImageSpec) -> tuple[Image.Image, tuple[int, int]]:
    """An upright RGB image and its original (upright) size; JPEGs are decoded at reduced scale
    when the target is at least 2x smaller (libjpeg DCT scaling: much faster, same result size)."""
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        width, height = image.size
        if width * height > spec.max_pixels:  # the header's claim, before any pixel is decoded
            raise Image.DecompressionBombError(
                f"{width}x{height} = {width * height} pixels > download.max_pixels {spec.max_pixels}"
            )
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
        if image.format == "JPEG":
            image.draft("RGB", draft_size(width, height, spec.resolution, spec.resize_mode))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        rgb = to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise Rejected("decompression_bomb", str(exc)) from None
    except UnidentifiedImageError:
        raise unidentified(data) from None
    except Exception as exc:  # hostile files make Pillow's parsers raise almost anything
        raise Rejected("decode_error", f"{type(exc).__name__}: {exc}") from None
    if orientation in _TRANSPOSED:
        width, height = height, width
    return rgb, (width, height)


def unidentified(data: bytes) -> Rejected:
    """`unsupported_format` when another Pillow plugin's header check knows the bytes (EPS, PSD,
    ...: never opened), else `not_an_image`. The checks compare magic bytes only."""
    Image.init()
    prefix = data[:16]
    for name, (_factory, accept) in Image.OPEN.items():
        if name not in ALLOWED_FORMATS and accept is not None and _accepts(accept, prefix):
            allowed = ", ".join(ALLOWED_FORMATS)
            return Rejected("unsupported_format", f"{name} is not one of {allowed}")
    return Rejected("not_an_image", f"{len(data)} bytes starting {prefix!r}")


def _accepts(accept, prefix: bytes) -> bool:
    try:
        return bool(accept(prefix))
    except Exception:  # a header check that chokes on a short prefix does not know the bytes
        return False


def draft_size(width: int, height: int, resolution: int, mode: ResizeMode) -> tuple[int, int]:
    """The smallest size a JPEG may be decoded at and still be resized without upscaling."""
    if mode == "none":
        return width, height
    if mode == "center_crop":
        scale = resolution / min(width, height)
    else:
        scale = shrink_scale(width, height, resolution, mode)
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def shrink_scale(width: int, height: int, resolution: int, mode: ResizeMode) -> float:
    """keep_ratio: the longer side at most `resolution`; max_area: width x height at most
    `resolution` squared (the aspect ratio kept, for aspect-ratio buckets). Never above 1."""
    if mode == "max_area":
        return min(1.0, math.sqrt(resolution * resolution / (width * height)))
    return min(1.0, resolution / max(width, height))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparent areas composited onto white (not the black Pillow would give)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: keep the top 8 bits instead of clipping everything above 255 to white
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    return image.convert("RGB")


def resize_image(image: Image.Image, resolution: int, mode: ResizeMode) -> Image.Image:
    """center_crop: shorter side to `resolution`, then the centre square (one resampling pass);
    keep_ratio: longer side shrunk to at most `resolution`, aspect kept, never enlarged;
    max_area: shrunk to at most `resolution`**2 pixels, aspect kept, never enlarged; none: unchanged."""
    width, height = image.size
    if mode == "none":
        return image
    if mode == "center_crop":
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        box = (left, top, left + side, top + side)
        return image.resize(
            (resolution, resolution), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0
        )
    scale = shrink_scale(width, height, resolution, mode)
    if scale >= 1:
        return image
    rounded = math.floor if mode == "max_area" else round  # max_area: never over the bound
    size = (max(1, rounded(width * scale)), max(1, rounded(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def cover_crop(image: Image.Image, width: int, height: int) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover `width` x `height` (aspect kept), then cut out the centre; also returns the
    crop's (top, left) in the resized image (what SDXL's `crops_coords_top_left` conditions on)."""
    if image.size == (width, height):
        return image, (0, 0)
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height)), (top, left)


def encode_image(image: Image.Image, image_format: ImageFormat, quality: int = 95) -> bytes:
    """Encode deterministically (same pixels -> same bytes), so reruns give identical shards."""
    buffer = io.BytesIO()
    if image_format == "png":
        # zlib's RLE strategy: ~3x faster than Pillow's default, and as small for photos and flat
        # synthetic images (measured on 256 px images; see bench/download.py)
        image.save(buffer, "PNG", compress_level=1, compress_type=zlib.Z_RLE)
    elif image_format == "jpeg":
        image.save(buffer, "JPEG", quality=quality)
    else:
        image.save(buffer, _PIL_FORMAT[image_format], quality=quality, method=4)
    return buffer.getvalue()
