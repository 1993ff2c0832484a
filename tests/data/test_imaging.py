"""Decoding, resizing and encoding one image (sdflow.data.imaging), on real encoded bytes."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from sdflow.data.imaging import ImageSpec, Rejected, draft_size, process_image


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
        ("max_area", 32, (35, 29)),  # area 1920 -> at most 1024: x 0.730, floored; 1015 px
        ("max_area", 64, (48, 40)),  # never enlarged
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


def test_the_pixel_limit_is_configurable_and_checked_before_decoding(make_image):
    data = make_image(48, 40)  # 1920 pixels
    assert process_image(data, ImageSpec(32, max_pixels=1920)).orig_width == 48
    with pytest.raises(Rejected) as caught:
        process_image(data, ImageSpec(32, max_pixels=1919))
    assert caught.value.reason == "decompression_bomb"
    assert "48x40 = 1920 pixels > download.max_pixels 1919" in caught.value.detail


def test_pillows_warning_band_is_refused_not_silenced():
    """Between Pillow's limit and twice it, Pillow only warns: sdflow's default refuses."""
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)  # 1.5x the limit: a warning for Pillow
    header = Image.new("1", (side, side))  # 1-bit: ~1.7 GB of pixels, 18 MB as BMP
    data = io.BytesIO()
    header.save(data, "BMP")
    with pytest.raises(Rejected) as caught:
        process_image(data.getvalue(), ImageSpec(32))
    assert caught.value.reason == "decompression_bomb"


EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 8 8
%%EndComments
newpath 0 0 moveto 8 8 lineto stroke
showpage
%%EOF
"""


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch):
    """A `gs` on PATH that only leaves a mark when it is run."""
    from PIL import EpsImagePlugin

    mark = tmp_path / "ghostscript-ran"
    gs = tmp_path / "bin" / "gs"
    gs.parent.mkdir()
    gs.write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{gs.parent}:{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # look it up again
    return mark


def test_eps_is_refused_as_unsupported_without_running_ghostscript(fake_ghostscript):
    with pytest.raises(Rejected) as caught:
        process_image(EPS, ImageSpec(32))
    assert caught.value.reason == "unsupported_format"
    assert caught.value.detail.startswith("EPS is not one of JPEG, PNG, WEBP, GIF, BMP, TIFF")
    assert not fake_ghostscript.exists()
    with pytest.raises(
        subprocess.CalledProcessError
    ):  # the control: Pillow with every plugin would have run it
        Image.open(io.BytesIO(EPS)).load()
    assert fake_ghostscript.exists()


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP"])
def test_the_other_allowed_formats_decode(make_image, fmt):
    out = process_image(make_image(48, 40, fmt), ImageSpec(16, "none"))
    assert (out.width, out.height) == (48, 40)
