"""Decoding, resizing and encoding one image (sdflow.imaging), on real encoded bytes."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from sdflow.imaging import ImageSpec, Rejected, draft_size, process_image


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize(
    ("mode", "resolution", "size"),
    [
        ("center_crop", 32, (32, 32)),
        ("center_crop", 64, (64, 64)),  # smaller images are enlarged to fill the square
        ("keep_ratio", 32, (32, 27)),  # longer side 48 -> 32, 40 * 32 / 48 = 26.7 -> 27
        ("keep_ratio", 64, (48, 40)),  # never enlarged
        ("none", 32, (48, 40)),
    ],
)
def test_resize_modes_give_documented_sizes(make_image, mode, resolution, size):
    data = make_image(48, 40)
    out = process_image(data, ImageSpec(resolution, mode))
    assert (out.width, out.height) == size
    assert decoded(out.data).size == size
    assert (out.orig_width, out.orig_height) == (48, 40)
    assert out.content_hash == hashlib.sha256(data).hexdigest()


def test_center_crop_keeps_the_middle(make_image):
    # 80x40: blue 20 px | red 40 px | blue 20 px; the centre square is all red
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, :, 2] = 255
    pixels[:, 20:60] = (255, 0, 0)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, "PNG")
    out = decoded(process_image(data.getvalue(), ImageSpec(16, "center_crop")).data)
    array = np.asarray(out).astype(int)
    assert array.shape == (16, 16, 3)
    assert array[:, 1:-1, 0].min() > 240 and array[:, 1:-1, 2].max() < 15


def test_large_jpeg_is_draft_decoded_to_the_right_size(make_image):
    data = make_image(800, 600, "JPEG", quality=90)
    assert draft_size(800, 600, 64, "center_crop") == (86, 64)
    out = process_image(data, ImageSpec(64, "center_crop", "jpeg"))
    assert (out.width, out.height, out.orig_width, out.orig_height) == (64, 64, 800, 600)
    assert decoded(out.data).format == "JPEG"


def test_exif_orientation_is_applied_and_reported(make_image):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    data = make_image(48, 40, "JPEG", exif=exif.tobytes())
    out = process_image(data, ImageSpec(64, "none", "png"))
    assert (out.width, out.height) == (40, 48)
    assert (out.orig_width, out.orig_height) == (40, 48)


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    data = io.BytesIO()
    image.save(data, "PNG")
    out = decoded(process_image(data.getvalue(), ImageSpec(16, "center_crop")).data)
    assert out.mode == "RGB"
    assert np.asarray(out).min() == 255


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encoding_is_deterministic_and_in_the_configured_format(make_image, fmt):
    data = make_image(60, 50, seed=3)
    first = process_image(data, ImageSpec(32, "center_crop", fmt, 90))
    second = process_image(data, ImageSpec(32, "center_crop", fmt, 90))
    assert first.data == second.data
    assert decoded(first.data).format == fmt.upper()


def test_failures_have_reasons(make_image, bomb_png):
    spec = ImageSpec(32)
    jpeg = make_image(48, 40, "JPEG")
    cases = {
        "empty_body": b"",
        "not_an_image": b"<html><body>not found</body></html>",
        "decode_error": jpeg[: len(jpeg) // 2],
        "decompression_bomb": bomb_png,
    }
    for reason, data in cases.items():
        with pytest.raises(Rejected) as caught:
            process_image(data, spec)
        assert caught.value.reason == reason, (reason, caught.value)
    assert Image.MAX_IMAGE_PIXELS is not None  # the bomb limit stays on
