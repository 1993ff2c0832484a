"""Curves (`sdflow.evaluation.curves`): the metric panels over checkpoints and the train stage's loss
curve, drawn with matplotlib, the same bytes for the same values."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sdflow.evaluation.curves import (
    LINE,
    VALIDATION,
    draw_loss_curve,
    draw_metric_curve,
    moving_average,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def coloured(png: bytes, colour: str) -> np.ndarray:
    """Where the image has `colour` (within 12 per channel: antialiased edges aside)."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return (np.abs(pixels - rgb) <= 12).all(-1)


def test_metric_curve_draws_one_panel_per_metric_with_values():
    rows = [
        {"step": 4, "fid": 9.0, "kid": 0.5, "precision": 0.2, "clip_score": None},
        {"step": 8, "fid": 3.0, "kid": 0.1, "precision": 0.6, "clip_score": None},
    ]
    png = draw_metric_curve(rows)
    assert Image.open(io.BytesIO(png)).size == (640, 2 * 180)  # fid, kid, precision: 2 rows of 2
    line = coloured(png, LINE)
    assert line[:180, :320].any() and line[:180, 320:].any() and line[180:, :320].any()
    assert not line[180:, 320:].any()  # no fourth panel: clip_score has no value
    assert draw_metric_curve(rows) == png  # no timestamp in the file: same values, same bytes


def test_loss_curve_shows_the_validation_loss_only_when_given():
    history = [[s, 1.0 / s, 1e-4] for s in range(1, 41)]
    plain = draw_loss_curve(history)
    with_validation = draw_loss_curve(history, validation=[[10, 0.3], [20, 0.2], [40, 0.25]])
    assert coloured(plain, LINE).any() and not coloured(plain, VALIDATION).any()
    assert coloured(with_validation, VALIDATION).sum() > 50
    assert draw_loss_curve(history) == plain


def test_moving_average_is_a_trailing_mean():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    expected = [np.mean(values[max(0, i - 2) : i + 1]) for i in range(len(values))]
    assert moving_average(values, 3) == pytest.approx(expected)
