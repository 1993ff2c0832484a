"""The report's figures: histograms drawn with PIL, as PNG bytes.

PIL rather than matplotlib: importing and laying out matplotlib figures took ~4 s of a run's end
(more under load) for four small bar charts; PIL draws each in milliseconds and is loaded anyway.
Drawing keeps no global state and is safe from any thread.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

SIZE = (400, 256)  # pixels
MARGIN = (44, 30, 12, 36)  # left, top, right, bottom: room for the title and the axis labels
BAR, AXIS, TEXT = "#3b75af", "#444444", "#111111"


def histogram(
    values: Sequence[float], title: str, xlabel: str, bins: int = 40, log_x: bool = False
) -> bytes:
    """A histogram of `values` with its count and median in the title, as PNG bytes."""
    data = np.asarray(values, dtype=np.float64)
    data = data[np.isfinite(data)]
    if log_x and data.size and data.min() > 0:
        edges = np.geomspace(data.min(), max(data.max(), data.min() * 1.01), bins + 1)
    else:
        edges = (
            np.histogram_bin_edges(data, bins=bins) if data.size else np.linspace(0, 1, bins + 1)
        )
    counts, edges = np.histogram(data, bins=edges)
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    median = f", median {np.median(data):.4g}" if data.size else ""
    draw.text((MARGIN[0], 8), f"{title} (n={data.size}{median})", fill=TEXT)
    _bars(draw, counts)
    _axes(draw, counts, edges, xlabel, log_x)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _plot_box() -> tuple[int, int, int, int]:
    left, top, right, bottom = MARGIN
    return left, top, SIZE[0] - right, SIZE[1] - bottom


def _bars(draw: ImageDraw.ImageDraw, counts: np.ndarray) -> None:
    left, top, right, bottom = _plot_box()
    tallest = max(int(counts.max()) if counts.size else 0, 1)
    width = (right - left) / max(len(counts), 1)
    for i, count in enumerate(counts):
        if count:
            height = (bottom - top) * count / tallest
            x0 = left + i * width
            draw.rectangle([x0, bottom - height, x0 + max(width - 1, 1), bottom], fill=BAR)


def _axes(draw, counts: np.ndarray, edges: np.ndarray, xlabel: str, log_x: bool) -> None:
    left, top, right, bottom = _plot_box()
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXIS)
    tallest = int(counts.max()) if counts.size else 0
    draw.text((4, top), f"{tallest}", fill=TEXT)
    draw.text((4, bottom - 10), "0", fill=TEXT)
    draw.text((4, (top + bottom) // 2), "rows", fill=TEXT)
    draw.text((left, bottom + 4), f"{edges[0]:.4g}", fill=TEXT)
    high = f"{edges[-1]:.4g}"
    draw.text((right - 6 * len(high), bottom + 4), high, fill=TEXT)
    label = xlabel + (" (log scale)" if log_x else "")
    draw.text(((left + right) // 2 - 3 * len(label), bottom + 18), label, fill=TEXT)
