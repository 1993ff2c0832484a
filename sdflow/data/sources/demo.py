"""The demo dataset: captioned coloured shapes, generated in seconds, no download needed.

`make_demo_dataset(Path("sdflow-work/demo-data"))` writes a `folder` source in the Hugging Face
imagefolder layout: `images/00000.png ...` plus `metadata.jsonl` rows `{"file_name", "caption"}`.
Each image holds one shape (circle, square or triangle) in red, green, blue or yellow on a white or
black background, captioned exactly "a {color} {shape} on a {background} background". Every
combination appears equally often (up to one), so a tiny model can learn all of them; the shape
spans 35-80 % of the side so it stays recognisable at 32 px, and no image repeats another. The same
(count, seed, size, extras) always gives byte-identical files; the directory appears atomically and
is reused when already complete.

`extra_shapes` (from `NEW_SHAPES`: a cross) and `extra_colors` (name -> RGB, e.g. `NEW_COLORS`'
purple) add concepts the default set lacks, for the fine-tune demo; every combination of old and
new still appears equally often. `unseen_samples` draws such images for the autoencoder's probe.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from itertools import product
from pathlib import Path

from PIL import Image, ImageDraw

from sdflow.errors import UserError

DEMO_VERSION = 1  # bump when the drawing changes, so old directories are regenerated
SHAPES = ("circle", "square", "triangle")
NEW_SHAPES = ("cross",)  # drawn on request only (extra_shapes, probes)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 30),
}
NEW_COLORS: dict[str, tuple[int, int, int]] = {"purple": (140, 40, 200), "orange": (245, 130, 20)}
# What `sdflow demo --finetune` adds to the demo's concepts (make_demo_dataset keyword arguments).
FINETUNE_EXTRAS: dict = {
    "extra_shapes": ("cross",),
    "extra_colors": {"purple": NEW_COLORS["purple"]},
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}
MIN_FRACTION, MAX_FRACTION = 0.35, 0.80  # shape side as a share of the image side
MARKER = "demo.json"
METADATA = "metadata.jsonl"

Combo = tuple[str, str, str]  # (shape, color, background)
Geometry = tuple[int, int, int]  # (side, x0, y0)
RGB = tuple[int, int, int]


def demo_caption(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def make_demo_dataset(
    out_dir: Path,
    count: int = 2400,
    seed: int = 0,
    size: int = 64,
    extra_shapes: tuple[str, ...] = (),
    extra_colors: dict[str, RGB] | None = None,
    min_fraction: float = MIN_FRACTION,
) -> Path:
    """Write (or reuse) the demo dataset in `out_dir` and return `out_dir`.

    `min_fraction` is the smallest shape side as a share of the image side (the largest is
    `MAX_FRACTION`): larger shapes stay readable at 16 px."""
    if count < 1 or size < 16:
        raise UserError(f"The demo dataset needs count >= 1 and size >= 16 (got {count}, {size}).")
    if not 0 < min_fraction <= MAX_FRACTION:
        raise UserError(
            f"The demo dataset's min_fraction is {min_fraction}; it must be in (0, {MAX_FRACTION}]."
        )
    shapes, colors = concepts(extra_shapes, extra_colors or {})
    out_dir = Path(out_dir)
    params = {"generator": __name__, "version": DEMO_VERSION, "count": count, "seed": seed}
    params["size"] = size
    if extra_shapes or extra_colors:  # the default set keeps its marker (and its bytes)
        params["extra_shapes"] = list(extra_shapes)
        params["extra_colors"] = {name: list(rgb) for name, rgb in (extra_colors or {}).items()}
    if min_fraction != MIN_FRACTION:  # likewise
        params["min_fraction"] = min_fraction
    if _is_complete(out_dir, params):
        return out_dir
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _write_dataset(tmp, count, seed, size, shapes, colors, min_fraction)
        (tmp / MARKER).write_text(json.dumps(params, sort_keys=True) + "\n")  # last: "complete"
        _install(tmp, out_dir, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def concepts(
    extra_shapes: tuple[str, ...], extra_colors: dict[str, RGB]
) -> tuple[tuple[str, ...], dict[str, RGB]]:
    """The demo's shapes and colours plus the extras, checked: known shapes, new one-word names."""
    for shape in extra_shapes:
        if shape not in NEW_SHAPES:
            raise UserError(
                f"extra_shapes has {shape!r}; the demo can draw these new shapes: "
                f"{', '.join(NEW_SHAPES)}"
            )
    for name, rgb in extra_colors.items():
        if name in COLORS or not name.isalpha() or not name.islower():
            raise UserError(
                f"extra_colors has {name!r}; a new colour needs a lower-case one-word name that "
                f"is none of {', '.join(COLORS)}"
            )
        if len(rgb) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in rgb):
            raise UserError(f"extra_colors[{name!r}] is {rgb!r}; expected three ints 0-255")
    return SHAPES + tuple(extra_shapes), {**COLORS, **extra_colors}


def plan_samples(
    count: int, seed: int, shapes: tuple[str, ...] = SHAPES, colors: dict[str, RGB] = COLORS
) -> list[Combo]:
    """`count` combinations, each equally often (up to one), in a seeded random order."""
    combos = list(product(shapes, colors, BACKGROUNDS))
    plan = [combos[i % len(combos)] for i in range(count)]
    random.Random(seed).shuffle(plan)
    return plan


def pick_geometry(
    size: int, rng: random.Random, used: set[Geometry], min_fraction: float = MIN_FRACTION
) -> Geometry:
    """Side and top-left corner of a shape fully inside a 1 px margin, unused for this combination
    when possible: exact duplicates would only be removed again by the filter's dedup."""
    for _ in range(100):
        side = rng.randint(round(min_fraction * size), round(MAX_FRACTION * size))
        geometry = (side, rng.randint(1, size - 1 - side), rng.randint(1, size - 1 - side))
        if geometry not in used:
            break
    return geometry


def draw_shape(
    shape: str, fill: RGB, background: RGB, size: int, geometry: Geometry
) -> Image.Image:
    """One shape in `fill` on a `background` image; `geometry` is its box (side, x0, y0)."""
    image = Image.new("RGB", (size, size), background)
    side, x0, y0 = geometry
    x1, y1 = x0 + side - 1, y0 + side - 1
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":  # upright, spanning the whole box
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    elif shape == "cross":  # a plus sign whose centred arms are a third of the side wide
        arm = round(side / 3)
        a, c = x0 + (side - arm) // 2, y0 + (side - arm) // 2
        draw.rectangle((a, y0, a + arm - 1, y1), fill=fill)
        draw.rectangle((x0, c, x1, c + arm - 1), fill=fill)
    else:
        raise ValueError(f"unknown demo shape {shape!r}")
    return image


def shape_mask(shape: str, size: int, geometry: Geometry) -> Image.Image:
    """The shape's pixels (255) in a grey-scale image: the template that `draw_shape` fills."""
    return draw_shape(shape, (255, 255, 255), (0, 0, 0), size, geometry).convert("L")


def unseen_samples(kind: str, count: int, size: int, seed: int = 0) -> list[Image.Image]:
    """Probe images of what the default demo set never shows: its shapes in `NEW_COLORS`
    (kind "colour"), or `NEW_SHAPES` in its colours (kind "shape"); seeded, balanced."""
    if kind == "colour":
        shapes, colors = SHAPES, NEW_COLORS
    elif kind == "shape":
        shapes, colors = NEW_SHAPES, COLORS
    else:
        raise ValueError(f"kind must be 'colour' or 'shape', not {kind!r}")
    rng = random.Random(f"{seed}-unseen-{kind}")
    images = []
    for shape, color, background in plan_samples(count, seed, shapes, colors):
        geometry = pick_geometry(size, rng, set())
        images.append(draw_shape(shape, colors[color], BACKGROUNDS[background], size, geometry))
    return images


def _write_dataset(
    root: Path,
    count: int,
    seed: int,
    size: int,
    shapes: tuple[str, ...],
    colors: dict[str, RGB],
    min_fraction: float,
) -> None:
    (root / "images").mkdir(parents=True)
    rng = random.Random(f"{seed}-geometry")  # separate stream: geometry independent of the plan
    used: dict[Combo, set[Geometry]] = {}
    digits = max(5, len(str(count - 1)))
    lines = []
    for index, combo in enumerate(plan_samples(count, seed, shapes, colors)):
        shape, color, background = combo
        geometry = pick_geometry(size, rng, used.setdefault(combo, set()), min_fraction)
        used[combo].add(geometry)
        name = f"images/{index:0{digits}d}.png"
        image = draw_shape(shape, colors[color], BACKGROUNDS[background], size, geometry)
        image.save(root / name, format="PNG")
        caption = demo_caption(color, shape, background)
        lines.append(json.dumps({"file_name": name, "caption": caption}))
    (root / METADATA).write_text("\n".join(lines) + "\n")


def _is_complete(out_dir: Path, params: dict) -> bool:
    return _read_marker(out_dir) == params and (out_dir / METADATA).is_file()


def _read_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _check_replaceable(out_dir: Path) -> None:
    """Only an empty directory or an older demo dataset may be replaced: never a user's files."""
    if not out_dir.exists():
        return
    if out_dir.is_dir() and (_read_marker(out_dir) is not None or not any(out_dir.iterdir())):
        return
    raise UserError(
        f"{out_dir} already exists and is not an sdflow demo dataset, so it was left untouched. "
        "Pass another directory for the demo data, or remove this one."
    )


def _install(tmp: Path, out_dir: Path, params: dict) -> None:
    """Move the finished dataset into place; an old one is renamed away first, then deleted."""
    trash = None
    if out_dir.exists():
        trash = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, trash)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if not _is_complete(out_dir, params):  # another process may have won the race
            raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
