"""Caption rules (`sdflow.data.captions`): what makes a caption a problem, and which backends supply
captions."""

from __future__ import annotations

import pytest

from sdflow.config import CaptionConfig, FilterConfig
from sdflow.data.captions import caption_problem, captions_supplied


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (None, "missing_caption"),
        ("", "missing_caption"),
        ("  \n\t ", "missing_caption"),
        ("cat", "caption_too_short"),  # 1 word < 2
        ("a b", "caption_too_short"),  # 3 chars < 5
        ("  a    cat  ", None),  # whitespace collapses: 2 words, 5 chars
        ("x" * 30 + " " + "y" * 29, None),  # exactly 60 chars
        ("x" * 30 + " " + "y" * 30, "caption_too_long"),
    ],
)
def test_caption_problem(text: str | None, reason: str | None) -> None:
    cfg = FilterConfig(min_caption_words=2, min_caption_chars=5, max_caption_chars=60)
    assert caption_problem(text, cfg) == reason


def test_captions_are_optional_without_minimums() -> None:
    cfg = FilterConfig(min_caption_words=0, min_caption_chars=0)
    assert caption_problem(None, cfg) is None and caption_problem("x", cfg) is None


def test_captions_supplied_only_by_template_or_generative_backends() -> None:
    assert not captions_supplied(CaptionConfig())
    assert captions_supplied(CaptionConfig(on_missing="template"))
