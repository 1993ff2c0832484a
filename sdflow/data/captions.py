"""Caption rules and clean-up, shared by the filter and caption stages so they never disagree.

The filter rejects samples whose caption breaks the rules, unless the caption stage will supply a
caption itself (`captions_supplied`); the caption stage applies the same rules to decide which
captions it must fill or reject. The caption stage also cleans captions (`clean_caption`),
combines source and generated captions per `caption.policy` (`combine_captions`) and fits the
result to `caption.max_tokens` (`caption_finisher`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache

from sdflow.config import CaptionConfig, FilterConfig, RunConfig
from sdflow.errors import UserError

MISSING = "missing_caption"
TOO_SHORT = "caption_too_short"
TOO_LONG = "caption_too_long"
NOT_GENERATED = "no_caption_generated"  # a generative backend returned nothing usable
SOURCE_BACKENDS = frozenset({"keep"})  # backends that use the source caption instead of writing one
RULE_FIELDS = ("min_caption_words", "min_caption_chars", "max_caption_chars")  # used by the rules
EDGE = " ,;:"  # left at a caption's ends when boilerplate or a cut removed what followed


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
    supplied = cfg.on_missing == "template" or cfg.backend not in SOURCE_BACKENDS
    return supplied or cfg.instance_prompt is not None


@lru_cache(maxsize=16)
def _compiled(patterns: tuple[str, ...]) -> list[re.Pattern[str]]:
    return [re.compile(p, re.IGNORECASE) for p in patterns]


def clean_caption(text: str | None, cfg: CaptionConfig) -> str:
    """Normalised, `caption.boilerplate` removed, separators left dangling by a removal tidied."""
    clean = normalize_caption(text)
    if not cfg.boilerplate or not clean:
        return clean
    for pattern in _compiled(tuple(cfg.boilerplate)):
        clean = pattern.sub(" ", clean)
    clean = re.sub(r"\s+([,;:])", r"\1", normalize_caption(clean))  # "cat , on" -> "cat, on"
    clean = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", clean)  # "cat,, on" -> "cat, on"
    return clean.strip(EDGE)


def usable_caption(text: str | None, rules: FilterConfig, cfg: CaptionConfig) -> str | None:
    """The cleaned source caption, or None when it breaks the filter's caption rules."""
    clean = clean_caption(text, cfg)
    return None if caption_problem(clean, rules) else clean


def needs_caption(existing: str | None, cfg: CaptionConfig) -> bool:
    """Whether the backend is asked for this row: per policy; `missing` asks for empty ones too."""
    return cfg.policy != "missing" or not existing


def combine_captions(existing: str | None, generated: str | None, cfg: CaptionConfig) -> str | None:
    """The row's caption under `caption.policy`; None: no caption (`on_missing` decides).

    `existing` is the usable source caption ("" when captions are optional and it is empty),
    `generated` the cleaned backend caption or None.
    """
    if cfg.instance_prompt:  # DreamBooth: one caption for every image
        return cfg.instance_prompt.format(trigger=cfg.trigger or "")
    if cfg.policy == "append":
        text = cfg.separator.join(t for t in (existing, generated) if t)
    elif cfg.policy == "all":
        text = generated or existing
    else:
        text = existing or generated
    return text or existing


def training_caption(text: str, cfg: CaptionConfig) -> str:
    """The caption the model is trained on: `caption_template` (with the trigger), then prefix and
    suffix applied verbatim."""
    if cfg.caption_template:
        text = cfg.caption_template.format(trigger=cfg.trigger or "", caption=text)
    return f"{cfg.prefix}{text}{cfg.suffix}"


def fit_caption(text: str, cfg: CaptionConfig, count: Callable[[str], int]) -> str:
    """`training_caption`, with words cut from the end of `text` until it has `max_tokens`."""
    full = training_caption(text, cfg)
    if cfg.max_tokens is None or count(full) <= cfg.max_tokens:
        return full
    words = text.split(" ")
    keep, over = 0, len(words)  # the longest fitting cut has keep <= n < over words
    while over - keep > 1:  # token counts grow with the words kept: bisect
        middle = (keep + over) // 2
        if count(training_caption(_cut(words, middle), cfg)) <= cfg.max_tokens:
            keep = middle
        else:
            over = middle
    return training_caption(_cut(words, keep), cfg)


def _cut(words: Sequence[str], n: int) -> str:
    return " ".join(words[:n]).rstrip(EDGE)


def caption_finisher(config: RunConfig) -> Callable[[str], str]:
    """`fit_caption` bound to this run's token counter; checks that prefix and suffix fit."""
    cfg = config.caption
    if cfg.max_tokens is None:
        return lambda text: training_caption(text, cfg)
    count = token_counter(config)
    fixed = count(training_caption("", cfg))
    if fixed >= cfg.max_tokens:
        raise UserError(
            f"caption.prefix and caption.suffix alone take {fixed} tokens, but caption.max_tokens "
            f"is {cfg.max_tokens}: raise max_tokens or shorten them."
        )
    return lambda text: fit_caption(text, cfg, count)


def token_counter(config: RunConfig) -> Callable[[str], int]:
    """Tokens of a caption without start/end tokens: the pretrained tokenizer, or CLIP pieces.

    A scratch run trains its tokenizer later, from these very captions, so there is nothing to
    count with yet; CLIP's pre-tokenizer pieces (words, single digits, punctuation runs) are the
    units every CLIP BPE token falls within, so the count is a lower bound for any CLIP-style
    tokenizer and exact for words the trained vocabulary holds whole.
    """
    if config.model.init == "pretrained":
        from transformers import CLIPTokenizer

        from sdflow.models.components import absolute_source, load_component

        source = absolute_source(config.model.pretrained)
        tokenizer = load_component(source, "tokenizer", CLIPTokenizer, config.model)
        return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)
    from tokenizers import Regex, pre_tokenizers

    from sdflow.models.tokenizer import CLIP_SPLIT

    split = pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True)
    return lambda text: len(split.pre_tokenize_str(text.lower()))


def tokenizer_identity(config: RunConfig) -> str | None:
    """What `token_counter` counts with, for the caption stage key."""
    if config.caption.max_tokens is None:
        return None
    if config.model.init == "pretrained":
        from sdflow.models.components import absolute_source
        from sdflow.models.files import weights_hash

        source = absolute_source(config.model.pretrained)
        return weights_hash(source, "tokenizer", config.model.revision)
    return "clip-pieces"
