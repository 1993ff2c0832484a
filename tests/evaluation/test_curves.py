"""Metric curves over checkpoints (`sdflow.evaluation.curves`)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_metric_curve_draws_one_panel_per_metric_with_values():
    import io

    from sdflow.evaluation.curves import draw_metric_curve

    rows = [
        {"step": 4, "fid": 9.0, "kid": 0.5, "precision": 0.2, "clip_score": None},
        {"step": 8, "fid": 3.0, "kid": 0.1, "precision": 0.6, "clip_score": None},
    ]
    image = Image.open(io.BytesIO(draw_metric_curve(rows))).convert("RGB")
    assert image.size == (640, 2 * 180)  # fid, kid, precision: two rows of two panels
    pixels = np.asarray(image)
    line = (pixels == (0x1F, 0x5F, 0xBF)).all(-1)
    assert line[:180, :320].any() and line[:180, 320:].any() and line[180:, :320].any()
    assert not line[180:, 320:].any()  # no fourth panel: clip_score has no value
