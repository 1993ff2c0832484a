"""Reading demo images back: every generated shape and colour, downscaled as training does."""

from __future__ import annotations

import random

import pytest
from PIL import Image, ImageFilter

from sdflow.data.sources.demo import (
    BACKGROUNDS,
    COLORS,
    NEW_COLORS,
    NEW_SHAPES,
    SHAPES,
    draw_shape,
    pick_geometry,
)
from sdflow.evaluation.demo_analysis import hit_rates, parse_prompt, read_image

PALETTE = {**COLORS, **NEW_COLORS}


def drawn(shape: str, colour: str, background: str, rng: random.Random) -> Image.Image:
    """A demo image at 64 px, downscaled to 32 px with bicubic filtering (as the demo trains)."""
    geometry = pick_geometry(64, rng, set())
    image = draw_shape(shape, PALETTE[colour], BACKGROUNDS[background], 64, geometry)
    return image.resize((32, 32), Image.BICUBIC)


@pytest.mark.parametrize("shape", SHAPES + NEW_SHAPES)
def test_every_drawn_shape_colour_and_background_is_read_back(shape: str) -> None:
    rng = random.Random(shape)
    for colour in PALETTE:
        for background in BACKGROUNDS:
            for _ in range(3):  # three random sizes and places
                reading = read_image(drawn(shape, colour, background, rng))
                assert (reading.shape, reading.colour, reading.background) == (
                    shape,
                    colour,
                    background,
                )
                assert reading.match > 0.75


def test_blurred_shapes_keep_their_colour_and_shape() -> None:
    rng = random.Random(1)
    for shape in SHAPES + NEW_SHAPES:
        for colour in ("purple", "red", "blue"):
            image = drawn(shape, colour, "black", rng).filter(ImageFilter.GaussianBlur(0.7))
            reading = read_image(image)
            assert (reading.shape, reading.colour) == (shape, colour)


def test_empty_and_grey_images_have_no_colour() -> None:
    blank = read_image(Image.new("RGB", (32, 32), (250, 250, 250)))
    assert (blank.background, blank.colour, blank.shape, blank.match) == ("white", None, None, 0)
    grey = Image.new("RGB", (32, 32), (0, 0, 0))
    grey.paste((128, 128, 128), (8, 8, 24, 24))
    reading = read_image(grey)
    assert (reading.background, reading.colour, reading.shape) == ("black", None, "square")


def test_hit_rates_count_each_prompt_word() -> None:
    rng = random.Random(2)
    samples = [
        ("a purple cross on a black background", drawn("cross", "purple", "black", rng)),
        ("a purple cross on a white background", drawn("circle", "purple", "white", rng)),
        ("a red cross on a black background", drawn("cross", "orange", "black", rng)),
        ("a red square on a black background", drawn("square", "red", "black", rng)),
    ]
    rates = hit_rates(samples)
    assert rates == {
        "purple": {"hits": 1.0, "count": 2},
        "cross": {"hits": 2 / 3, "count": 3},
        "red": {"hits": 0.5, "count": 2},
        "square": {"hits": 1.0, "count": 1},
    }
    with pytest.raises(ValueError, match="not a demo caption"):
        parse_prompt("purple cross")
