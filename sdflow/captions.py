"""Caption rules and clean-up, shared by the filter and caption stages so they never disagree.

The filter rejects samples whose caption breaks the rules, unless the caption stage will supply a
caption itself (`captions_supplied`); the caption stage applies the same rules to decide which
captions it must fill or reject.
"""

from __future__ import annotations

from sdflow.config import CaptionConfig, FilterConfig

MISSING = "missing_caption"
TOO_SHORT = "caption_too_short"
TOO_LONG = "caption_too_long"
SOURCE_BACKENDS = frozenset({"keep"})  # backends that use the source caption instead of writing one
RULE_FIELDS = ("min_caption_words", "min_caption_chars", "max_caption_chars")  # used by the rules


def normalize_caption(text: str | None) -> str:
    """Whitespace collapsed to single spaces and stripped; a missing caption becomes ""."""
    return " ".join(text.split()) if text else ""


def caption_problem(text: str | None, cfg: FilterConfig) -> str | None:
    """Why a caption is unusable under the filter rules (a failure reason), or None if it is fine.

    An empty caption is only a problem when a minimum length is set: with both minimums at 0,
    captions are optional (e.g. for unconditional training).
    """
    clean = normalize_caption(text)
    if not clean:
        return MISSING if cfg.min_caption_words > 0 or cfg.min_caption_chars > 0 else None
    if len(clean.split(" ")) < cfg.min_caption_words or len(clean) < cfg.min_caption_chars:
        return TOO_SHORT
    if len(clean) > cfg.max_caption_chars:
        return TOO_LONG
    return None


def caption_rules(cfg: FilterConfig) -> dict[str, int]:
    """The filter settings `caption_problem` reads (for stage keys)."""
    return {name: getattr(cfg, name) for name in RULE_FIELDS}


def describe_caption(text: str | None) -> str:
    """A short failure detail: the length of the caption as the rules measure it."""
    clean = normalize_caption(text)
    words = len(clean.split(" ")) if clean else 0
    return f"{words} words, {len(clean)} chars"


def captions_supplied(cfg: CaptionConfig) -> bool:
    """True when the caption stage fills or replaces unusable captions: the filter keeps them."""
    return cfg.on_missing == "template" or cfg.backend not in SOURCE_BACKENDS


def training_caption(text: str, cfg: CaptionConfig) -> str:
    """The caption the model is trained on: prefix and suffix applied verbatim."""
    return f"{cfg.prefix}{text}{cfg.suffix}"
