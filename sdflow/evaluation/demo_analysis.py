"""Reading a demo image back: which background, colour and shape does it show?

Used to check generated images against their prompt ("a purple cross on a black background")
without a learned classifier. The background is the colour of the border pixels; the foreground is
every pixel far from it; its colour is the demo colour nearest in hue to the foreground's median
(`sdflow.data.sources.demo`'s palette, new colours included); its shape is the demo shape whose own mask
(`shape_mask`, the generator's drawing code) overlaps the foreground's bounding box best
(intersection over union), the foreground's edge taken half-way between background and fill.
"""

from __future__ import annotations

import colorsys
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import product

import numpy as np
from PIL import Image

from sdflow.data.sources.demo import BACKGROUNDS, COLORS, NEW_COLORS, NEW_SHAPES, SHAPES, shape_mask

PALETTE = {**COLORS, **NEW_COLORS}
ALL_SHAPES = SHAPES + NEW_SHAPES
PROMPT = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")
FOREGROUND_DISTANCE = 90.0  # RGB distance from the background that makes a pixel foreground
MIN_FOREGROUND = 0.03  # a smaller foreground share of the image is "no shape"
MIN_SATURATION = 0.25  # a greyer foreground has no demo colour


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None  # None: no foreground, or a grey one
    shape: str | None  # None: no foreground
    match: float  # intersection over union of the best shape template (0 without one)


def read_image(
    image: Image.Image,
    palette: Mapping[str, tuple[int, int, int]] = PALETTE,
    shapes: Iterable[str] = ALL_SHAPES,
) -> Reading:
    """What the image shows, as the nearest demo background, colour (by hue) and shape."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    ground = np.median(border, axis=0)
    background = min(BACKGROUNDS, key=lambda n: np.linalg.norm(ground - BACKGROUNDS[n]))
    distance = np.linalg.norm(pixels - ground, axis=2)
    mask = distance > FOREGROUND_DISTANCE
    if mask.mean() < MIN_FOREGROUND:
        return Reading(background, None, None, 0.0)
    fill = np.median(pixels[mask], axis=0)
    colour = nearest_hue(fill, palette)
    # the shape's edge is where a pixel is half-way between background and fill (anti-aliasing)
    edge = max(FOREGROUND_DISTANCE, float(np.linalg.norm(fill - ground)) / 2)
    shape, match = best_template(distance > edge, shapes)
    return Reading(background, colour, shape, match)


def nearest_hue(rgb: np.ndarray, palette: Mapping[str, tuple[int, int, int]]) -> str | None:
    """The palette colour nearest in hue (on the colour circle); None for a grey colour."""
    hue, saturation, _ = colorsys.rgb_to_hsv(*(float(v) / 255 for v in rgb))
    if saturation < MIN_SATURATION:
        return None

    def distance(name: str) -> float:
        other = colorsys.rgb_to_hsv(*(v / 255 for v in palette[name]))[0]
        turn = abs(hue - other) % 1.0
        return min(turn, 1.0 - turn)

    return min(palette, key=distance)


def best_template(mask: np.ndarray, shapes: Iterable[str]) -> tuple[str, float]:
    """The shape whose mask, drawn in the foreground's bounding box, overlaps it best (IoU).

    The box is also tried 1 px smaller on any of its sides: a blurred edge can widen it."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    fits = list(product((0, 1), repeat=4))  # (top, bottom, left, right) margins
    scores = {shape: max(_iou(crop, shape, fit) for fit in fits) for shape in shapes}
    shape = max(scores, key=scores.__getitem__)
    return shape, scores[shape]


def _iou(crop: np.ndarray, shape: str, fit: tuple[int, int, int, int]) -> float:
    top, bottom, left, right = fit
    height, width = crop.shape[0] - top - bottom, crop.shape[1] - left - right
    if min(height, width) < 3:
        return 0.0
    side = max(height, width)
    template = shape_mask(shape, side, (side, 0, 0)).resize((width, height), Image.BILINEAR)
    drawn = np.zeros_like(crop)
    drawn[top : top + height, left : left + width] = np.asarray(template) >= 128
    return float(np.logical_and(drawn, crop).sum() / np.logical_or(drawn, crop).sum())


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """("purple", "cross", "black") from "a purple cross on a black background"."""
    match = PROMPT.match(prompt)
    if not match:
        raise ValueError(f"{prompt!r} is not a demo caption 'a COLOUR SHAPE on a BG background'")
    return match[1], match[2], match[3]


def hit_rates(samples: Iterable[tuple[str, Image.Image]]) -> dict[str, dict[str, float]]:
    """Per prompt word (colour or shape): the share of its images whose reading has that word.

    `samples` are (prompt, generated image) pairs; the result maps each colour and shape word of
    the prompts to {"hits": share of its images read as that word, "count": its images}.
    """
    tallies: dict[str, list[int]] = {}
    for prompt, image in samples:
        colour, shape, _ = parse_prompt(prompt)
        reading = read_image(image)
        tallies.setdefault(colour, []).append(reading.colour == colour)
        tallies.setdefault(shape, []).append(reading.shape == shape)
    return {
        word: {"hits": float(np.mean(hits)), "count": len(hits)} for word, hits in tallies.items()
    }
