"""The metric-vs-step curve of `eval.checkpoints: all`: one small panel per metric, as a PNG."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw

CURVE_METRICS = ("fid", "kid", "precision", "recall", "coverage", "clip_score")
PANEL = (320, 180)
MARGIN = (56, 12, 24, 28)  # left, right, top, bottom


def draw_metric_curve(rows: Sequence[dict[str, Any]]) -> bytes:
    """PNG: each metric with at least one value, over the checkpoint steps, two panels a row."""
    names = [m for m in CURVE_METRICS if any(r.get(m) is not None for r in rows)]
    cols = 2
    height = PANEL[1] * max(1, (len(names) + cols - 1) // cols)
    image = Image.new("RGB", (PANEL[0] * cols, height), "white")
    draw = ImageDraw.Draw(image)
    if not names:
        draw.text((10, 10), "no checkpoint scores", fill="black")
    for index, name in enumerate(names):
        origin = ((index % cols) * PANEL[0], (index // cols) * PANEL[1])
        points = [(r["step"], r[name]) for r in rows if r.get(name) is not None]
        _panel(draw, origin, name, points)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _panel(draw: ImageDraw.ImageDraw, origin: tuple[int, int], name: str, points: list) -> None:
    left, right, top, bottom = MARGIN
    x0, y0 = origin
    box = (x0 + left, y0 + top, x0 + PANEL[0] - right, y0 + PANEL[1] - bottom)
    draw.rectangle(box, outline="black")
    draw.text((box[0], y0 + 6), f"{name} by step", fill="black")
    steps, values = [p[0] for p in points], [p[1] for p in points]
    low, high = min(values), max(values)
    first, last = min(steps), max(steps)

    def xy(step: float, value: float) -> tuple[float, float]:
        x = box[0] + (box[2] - box[0]) * ((step - first) / ((last - first) or 1))
        y = box[3] - (box[3] - box[1]) * ((value - low) / ((high - low) or 1))
        return x, y

    coords = [xy(s, v) for s, v in sorted(points)]
    if len(coords) > 1:
        draw.line(coords, fill="#1f5fbf", width=2)
    for x, y in coords:
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill="#1f5fbf")
    draw.text((x0 + 4, box[1]), f"{high:.4g}", fill="black")
    draw.text((x0 + 4, box[3] - 10), f"{low:.4g}", fill="black")
    draw.text((box[0], box[3] + 4), str(int(first)), fill="black")
    draw.text((box[2] - 40, box[3] + 4), str(int(last)), fill="black")
