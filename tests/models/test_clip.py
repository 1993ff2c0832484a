"""The CLIP scorer of a local directory (`sdflow.models.clip`): CLIP score against CLIPModel.forward,
long captions truncated with their end token, a missing directory."""

from __future__ import annotations

import math

import pytest
from fixtures.clip import CAPTIONS, draw_shapes, pair_cosines
from transformers import CLIPModel, CLIPProcessor

from sdflow.errors import UserError
from sdflow.models.clip import load_clip, make_clip_score

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_clip_score_from_a_local_directory(clip_dir):
    images = draw_shapes(4, seed=0)
    score = make_clip_score(str(clip_dir))
    score.update(images[:2], CAPTIONS[:2])  # two batches, as the evaluate stage feeds it
    score.update(images[2:], CAPTIONS[2:])
    value = float(score.compute())
    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    expected = 100 * float(pair_cosines(model, processor, images, CAPTIONS).mean())
    assert math.isfinite(value) and 0.0 < value <= 100.0
    assert value == pytest.approx(expected, rel=1e-4)


def test_clip_truncates_long_captions_keeping_the_end_token(clip_dir):
    _, processor = load_clip(str(clip_dir))
    long_caption = " ".join(["a very long caption"] * 20)
    ids = processor(text=[long_caption, "a red circle"], return_tensors="pt", padding=True)
    ids = ids["input_ids"]
    assert ids.shape[1] == 16
    assert ids[0, -1].item() == 1  # the end-of-text token CLIP pools the caption from


def test_clip_model_missing_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="eval.clip_model"):
        load_clip(str(tmp_path / "no-such-clip"))
