"""Caption clean-up and combination rules (sdflow.data.captions) that every backend's output goes through."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sdflow.config import CaptionConfig
from sdflow.data.captions import clean_caption, combine_captions, fit_caption, needs_caption


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("arafed man sitting on a bench", "man sitting on a bench"),
        ("there are two dogs in the snow", "two dogs in the snow"),
        ("Cute cat , stock photo, on grass", "Cute cat, on grass"),
        ("a dog, royalty-free", "a dog"),
        ("IMG_1234.JPG", ""),
        ("photo DSC_0042.jpg of a cake", "photo of a cake"),
        ("  a red   circle\n", "a red circle"),
        ("there is no boilerplate in this one", "no boilerplate in this one"),
        ("a theremin on a table", "a theremin on a table"),  # only whole phrases are removed
        (None, ""),
    ],
)
def test_boilerplate_is_removed(raw: str | None, clean: str) -> None:
    assert clean_caption(raw, CaptionConfig()) == clean


def test_boilerplate_is_configurable() -> None:
    assert clean_caption("arafed man", CaptionConfig(boilerplate=[])) == "arafed man"
    assert clean_caption("a cat, 4k, hdr", CaptionConfig(boilerplate=[r"\b4k\b"])) == "a cat, hdr"
    with pytest.raises(ValidationError, match="is not a regex"):
        CaptionConfig(boilerplate=["(unclosed"])


@pytest.mark.parametrize(
    ("policy", "existing", "generated", "combined"),
    [
        ("missing", "source", "blip", "source"),
        ("missing", None, "blip", "blip"),
        ("missing", "", "blip", "blip"),  # optional captions: empty ones are still filled
        ("missing", None, None, None),
        ("all", "source", "blip", "blip"),
        ("all", "source", None, "source"),
        ("all", None, None, None),
        ("append", "source", "blip", "source; blip"),
        ("append", None, "blip", "blip"),
        ("append", "source", None, "source"),
        ("append", "", None, ""),  # optional and empty: stays empty, not missing
    ],
)
def test_policies_combine_source_and_generated(
    policy: str, existing: str | None, generated: str | None, combined: str | None
) -> None:
    cfg = CaptionConfig(backend="blip", policy=policy, separator="; ")
    assert combine_captions(existing, generated, cfg) == combined
    assert needs_caption(existing, cfg) == (policy != "missing" or not existing)


def test_fit_cuts_at_words_and_keeps_prefix_and_suffix() -> None:
    def count(text: str) -> int:
        return len(text.split())

    cfg = CaptionConfig(prefix="sks ", suffix=" style", max_tokens=5)
    assert fit_caption("a red circle", cfg, count) == "sks a red circle style"
    assert fit_caption("a red circle, on black, large", cfg, count) == "sks a red circle style"
    assert fit_caption("one, two three", cfg, count) == "sks one, two three style"
    cfg.max_tokens = 3
    assert fit_caption("one, two three", cfg, count) == "sks one style"  # no dangling comma
    cfg.max_tokens = None
    assert fit_caption("a b c d e f g", cfg, count) == "sks a b c d e f g style"
