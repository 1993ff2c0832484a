"""The demo dataset: captioned coloured shapes, generated in seconds, no download needed.

`make_demo_dataset(Path("sdflow-work/demo-data"))` writes a `folder` source in the Hugging Face
imagefolder layout: `images/00000.png ...` plus `metadata.jsonl` rows `{"file_name", "caption"}`.
Each image holds one shape (circle, square or triangle) in red, green, blue or yellow on a white or
black background, captioned exactly "a {color} {shape} on a {background} background". Every
combination appears equally often (up to one), so a tiny model can learn all of them; the shape
spans 35-80 % of the side so it stays recognisable at 32 px, and no image repeats another. The same
(count, seed, size) always gives byte-identical files; the directory appears atomically and is
reused when already complete.
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
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}
MIN_FRACTION, MAX_FRACTION = 0.35, 0.80  # shape side as a share of the image side
MARKER = "demo.json"
METADATA = "metadata.jsonl"

Combo = tuple[str, str, str]  # (shape, color, background)
Geometry = tuple[int, int, int]  # (side, x0, y0)


def demo_caption(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def make_demo_dataset(out_dir: Path, count: int = 2400, seed: int = 0, size: int = 64) -> Path:
    """Write (or reuse) the demo dataset in `out_dir` and return `out_dir`."""
    if count < 1 or size < 16:
        raise UserError(f"The demo dataset needs count >= 1 and size >= 16 (got {count}, {size}).")
    out_dir = Path(out_dir)
    params = {"generator": __name__, "version": DEMO_VERSION, "count": count, "seed": seed}
    params["size"] = size
    if _is_complete(out_dir, params):
        return out_dir
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _write_dataset(tmp, count, seed, size)
        (tmp / MARKER).write_text(json.dumps(params, sort_keys=True) + "\n")  # last: "complete"
        _install(tmp, out_dir, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def plan_samples(count: int, seed: int) -> list[Combo]:
    """`count` combinations, each of the 24 equally often (up to one), in a seeded random order."""
    combos = list(product(SHAPES, COLORS, BACKGROUNDS))
    plan = [combos[i % len(combos)] for i in range(count)]
    random.Random(seed).shuffle(plan)
    return plan


def pick_geometry(size: int, rng: random.Random, used: set[Geometry]) -> Geometry:
    """Side and top-left corner of a shape fully inside a 1 px margin, unused for this combination
    when possible: exact duplicates would only be removed again by the filter's dedup."""
    for _ in range(100):
        side = rng.randint(round(MIN_FRACTION * size), round(MAX_FRACTION * size))
        geometry = (side, rng.randint(1, size - 1 - side), rng.randint(1, size - 1 - side))
        if geometry not in used:
            break
    return geometry


def draw_shape(
    shape: str, color: str, background: str, size: int, geometry: Geometry
) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    side, x0, y0 = geometry
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    draw = ImageDraw.Draw(image)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # an upright triangle spanning the whole box
        draw.polygon(
            [(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=fill
        )
    return image


def _write_dataset(root: Path, count: int, seed: int, size: int) -> None:
    (root / "images").mkdir(parents=True)
    rng = random.Random(f"{seed}-geometry")  # separate stream: geometry independent of the plan
    used: dict[Combo, set[Geometry]] = {}
    digits = max(5, len(str(count - 1)))
    lines = []
    for index, combo in enumerate(plan_samples(count, seed)):
        shape, color, background = combo
        geometry = pick_geometry(size, rng, used.setdefault(combo, set()))
        used[combo].add(geometry)
        name = f"images/{index:0{digits}d}.png"
        draw_shape(shape, color, background, size, geometry).save(root / name, format="PNG")
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
