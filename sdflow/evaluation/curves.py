"""Curves as PNGs, drawn with matplotlib (Agg): the train stage's loss curve (`loss.png`: the loss per
step, its moving average, the held-out validation loss) and the evaluate stage's metric-vs-step
panels for `eval.checkpoints: all`. The PNGs carry no timestamp or version metadata, so the same
values always give the same bytes (stage fingerprints cover these files)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

CURVE_METRICS = ("fid", "kid", "precision", "recall", "coverage", "clip_score")
LINE, RAW, VALIDATION = "#1f5fbf", "#b0b0b0", "#e07b00"
DPI = 100


def draw_loss_curve(
    history: Sequence[Sequence[float]], validation: Sequence[Sequence[float]] | None = None
) -> bytes:
    """The loss per step (grey) and its moving average (blue); the validation loss (orange, a dot
    per validation) when given. `history` rows are [step, loss, ...]."""
    from matplotlib.figure import Figure  # imported when drawing: the modules load faster

    figure = Figure(figsize=(6.4, 3.6), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    steps = [row[0] for row in history]
    losses = [row[1] for row in history]
    axes.plot(steps, losses, color=RAW, linewidth=1, label="loss")
    window = max(1, len(losses) // 20)
    axes.plot(steps, moving_average(losses, window), color=LINE, linewidth=2,
              label=f"moving average ({window} steps)")  # fmt: skip
    if validation:
        axes.plot(*zip(*[(s, v) for s, v in validation], strict=True), color=VALIDATION,
                  marker="o", linewidth=2, label="validation loss")  # fmt: skip
    axes.set(xlabel="step", ylabel="loss", title="training loss")
    axes.legend(fontsize=8)
    return _png(figure)


def draw_metric_curve(rows: Sequence[dict[str, Any]]) -> bytes:
    """Each metric with at least one value over the checkpoint steps, two panels a row."""
    from matplotlib.figure import Figure

    names = [m for m in CURVE_METRICS if any(r.get(m) is not None for r in rows)]
    panel_rows = max(1, (len(names) + 1) // 2)
    figure = Figure(figsize=(6.4, 1.8 * panel_rows), dpi=DPI, layout="constrained")
    if not names:
        figure.text(0.05, 0.5, "no checkpoint scores")
    for index, name in enumerate(names):
        axes = figure.add_subplot(panel_rows, 2, index + 1)
        points = sorted((r["step"], r[name]) for r in rows if r.get(name) is not None)
        axes.plot(*zip(*points, strict=True), color=LINE, marker="o", linewidth=2)
        axes.set_title(f"{name} by step", fontsize=9)
        axes.tick_params(labelsize=7)
    return _png(figure)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """The mean of each value and the `window - 1` before it (fewer at the start)."""
    sums = np.cumsum(np.asarray(values, dtype=np.float64))
    out = []
    for i in range(len(values)):
        start = i - window
        out.append((sums[i] - (sums[start] if start >= 0 else 0.0)) / min(i + 1, window))
    return out


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
