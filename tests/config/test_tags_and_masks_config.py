"""`train.caption_shuffle`, `train.keep_tokens`, `train.masked_loss`: bad combinations are refused
with the key, the value and what to change."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sdflow.config import TrainConfig


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"keep_tokens": 2}, "train.keep_tokens is 2 but train.caption_shuffle is false"),
        ({"keep_tokens": -1, "caption_shuffle": True}, "greater than or equal to 0"),
        (
            {"masked_loss": True, "cache_latents": False},
            "train.masked_loss is true but train.cache_latents is false",
        ),
    ],
)
def test_bad_combinations_are_refused(settings, message):
    with pytest.raises(ValidationError, match=message):
        TrainConfig(**settings)


def test_the_defaults_change_nothing():
    train = TrainConfig()
    assert (train.caption_shuffle, train.keep_tokens, train.masked_loss) == (False, 0, False)
