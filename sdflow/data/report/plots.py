"""The report's figures: histograms drawn with matplotlib (Agg, no display), as PNG bytes.

`Figure` is used without pyplot, so drawing keeps no global state and is safe from any thread.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

DPI = 80
SIZE = (5.0, 3.2)  # inches: 400 x 256 px


def histogram(
    values: Sequence[float] | np.ndarray,
    title: str,
    xlabel: str,
    bins: int = 40,
    log_x: bool = False,
    count: int | None = None,
) -> bytes:
    """A histogram of `values` with its count and median in the title, as PNG bytes. `count`: the
    rows `values` were sampled from, when they are a sample (the title says so)."""
    from matplotlib.figure import Figure  # imported when drawing: the flow module loads faster

    data = np.asarray(values, dtype=np.float64)
    data = data[np.isfinite(data)]
    figure = Figure(figsize=SIZE, dpi=DPI)
    # fixed margins: constrained layout measured every label's extent, 40 % of a 50-row report
    figure.subplots_adjust(left=0.14, right=0.97, top=0.9, bottom=0.16)
    axes = figure.add_subplot()
    if log_x and data.size and data.min() > 0:
        edges = np.geomspace(data.min(), max(data.max(), data.min() * 1.01), bins + 1)
        axes.set_xscale("log")
        axes.hist(data, bins=edges, color="#3b75af")
    else:
        axes.hist(data, bins=bins, color="#3b75af")
    median = f", median {np.median(data):.4g}" if data.size else ""
    sampled = f", {data.size} sampled" if count is not None and count > data.size else ""
    shown = data.size if count is None else count
    axes.set_title(f"{title} (n={shown}{sampled}{median})", fontsize=10)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("rows")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
