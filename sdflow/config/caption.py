"""The `caption` section and its CLIP-interrogator settings."""

from __future__ import annotations

import re
from importlib.util import find_spec
from typing import Literal

from pydantic import Field, model_validator

from sdflow.config.base import Section


class InterrogatorConfig(Section):
    """clip-interrogator settings (`caption.backend: clip-interrogator`, needs the caption extra)."""

    mode: Literal["fast", "classic", "best", "negative"] = Field(
        "fast",
        description="fast: caption + top-ranked terms; classic: caption + medium, artist, "
        "movement, flavors; best: a CLIP-guided chain of terms (slow); negative: the least "
        "similar terms, for a negative prompt (no caption model)",
    )
    clip_model: str = Field(
        "ViT-L-14/openai",
        min_length=1,
        description="open_clip 'architecture/pretrained-tag' (downloaded by open_clip), or a local "
        "open_clip directory (open_clip_config.json + weights), used offline",
    )
    data_path: str | None = Field(
        None,
        description="directory of term lists (artists.txt, flavors.txt, mediums.txt, "
        "movements.txt, negative.txt); unset: the lists bundled with clip-interrogator",
    )


# Phrases that carry no content: BLIP's "arafed"-style artefacts, empty openers, stock-photo and
# camera-file-name alt text. Regexes, matched case-insensitively and removed.
BOILERPLATE = [
    r"\b(?:arafed|araffe|arafe|araf|arafly|arrafed|arrafe)\b",
    r"^(?:there (?:is|are)|this is)\s+",
    r"\b(?:stock (?:photo|image|picture)s?|royalty[- ]free)\b",
    r"\b[\w-]+\.(?:jpe?g|png|gif|webp|bmp|tiff?)\b",
    r"\b(?:img|dsc|dscn|dcim|pxl)[_-]?\d+\b",
]
EXTRA_MODULES = {"clip-interrogator": ("clip_interrogator", "open_clip")}


class CaptionConfig(Section):
    """How each kept sample gets its training caption.

    Per row: the source caption is cleaned (`boilerplate`) and is usable when it passes the
    filter's caption rules. `policy` decides which rows the backend captions and how its caption
    combines with the source one; a row that still has no caption is handled by `on_missing`.
    The source caption is always kept in the `source_caption` column.
    """

    backend: Literal["keep", "blip", "clip-interrogator"] = Field(
        "keep",
        description="keep: the source caption; blip: BLIP / BLIP-2 through transformers, "
        "batched; clip-interrogator: BLIP caption + CLIP-ranked terms (caption extra)",
    )
    policy: Literal["missing", "all", "append"] = Field(
        "missing",
        description="missing: caption only rows without a usable caption; all: replace every "
        "caption (a row the backend leaves empty keeps its usable source caption); append: "
        "source caption + `separator` + generated",
    )
    on_missing: Literal["fail", "template"] = Field(
        "fail",
        description="a row still without a usable caption after the policy and the backend: "
        "reject it (recorded in failures), or caption it with `template`",
    )
    template: str = Field("a photo", min_length=1, description="caption for `on_missing: template`")
    prefix: str = Field("", description="prepended verbatim, separator included, e.g. 'sks, '")
    suffix: str = Field("", description="appended verbatim, separator included, e.g. ', 4k'")
    instance_prompt: str | None = Field(
        None,
        min_length=1,
        description="DreamBooth's instance prompt: the caption of every image, source captions "
        "unused (sets without captions), e.g. 'a photo of {trigger} dog'; needs backend keep",
    )
    trigger: str | None = Field(
        None, min_length=1, description="the subject's identifier, e.g. 'sks': fills {trigger}"
    )
    caption_template: str | None = Field(
        None,
        min_length=1,
        description="each row's own caption rewritten as this, e.g. '{trigger}, {caption}' "
        "(placeholders {trigger} and {caption}), before prefix and suffix",
    )
    separator: str = Field(", ", description="between source and generated caption (append)")
    boilerplate: list[str] = Field(
        default_factory=lambda: list(BOILERPLATE),
        description="regexes removed (case-insensitive) from source and generated captions "
        "before the rules are checked; [] keeps captions as they are",
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="cut captions (prefix and suffix included) at a word boundary to this many "
        "tokens, start/end tokens not counted (75 fits SD's 77); counted with the pretrained "
        "model's tokenizer, or, for scratch runs (tokenizer not trained yet), as CLIP "
        "pre-tokenizer pieces: words, digits, punctuation runs",
    )
    batch_size: int = Field(64, ge=1, le=4096, description="images per captioner call")
    model: str = Field(
        "Salesforce/blip-image-captioning-base",
        min_length=1,
        description="BLIP or BLIP-2 caption model (both generative backends): hub name or "
        "local directory with its processor",
    )
    revision: str | None = Field(None, description="hub revision of `model`; pin it")
    prompt: str = Field(
        "", description="conditional prefix the caption model continues, e.g. 'a photograph of'"
    )
    max_new_tokens: int = Field(40, ge=1, le=512, description="longest generated caption")
    num_beams: int = Field(1, ge=1, le=16, description="1: greedy decoding; more: beam search")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="caption model weights; auto: float16 on a GPU, float32 on CPU"
    )
    interrogator: InterrogatorConfig = Field(default_factory=InterrogatorConfig)

    @model_validator(mode="after")
    def _consistent(self) -> CaptionConfig:
        if self.backend == "keep" and self.policy != "missing":
            raise ValueError(
                f"caption.policy {self.policy!r} needs a generative backend (blip or "
                "clip-interrogator); the keep backend only uses source captions"
            )
        for pattern in self.boilerplate:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"boilerplate pattern {pattern!r} is not a regex: {exc}") from None
        check_instance_captions(self)
        missing = [m for m in EXTRA_MODULES.get(self.backend, ()) if find_spec(m) is None]
        if missing:
            raise ValueError(
                f"caption.backend {self.backend!r} needs the optional caption extra "
                f"({', '.join(missing)} not installed): pip install -e '.[caption]'"
            )
        return self


def check_instance_captions(cfg: CaptionConfig) -> None:
    """`instance_prompt`, `caption_template` and `trigger` fit together (DreamBooth captions)."""
    if cfg.instance_prompt and cfg.caption_template:
        raise ValueError(
            "caption.instance_prompt and caption.caption_template are both set: the instance "
            "prompt replaces every caption, the template rewrites each row's own; set one"
        )
    if cfg.instance_prompt and cfg.backend != "keep":
        raise ValueError(
            f"caption.instance_prompt is set but caption.backend is {cfg.backend!r}: the instance "
            "prompt replaces every caption, so a captioner would run for nothing; use backend keep"
        )
    if cfg.caption_template and "{caption}" not in cfg.caption_template:
        raise ValueError(
            f"caption.caption_template {cfg.caption_template!r} has no {{caption}}: it rewrites "
            "each row's caption; for one caption for every image use caption.instance_prompt"
        )
    for key in ("instance_prompt", "caption_template"):
        text = getattr(cfg, key)
        if text is None:
            continue
        try:
            text.format(trigger=cfg.trigger or "", caption="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"caption.{key} {text!r} is not a template with only {{trigger}} and "
                f"{{caption}} placeholders ({exc!r}); write literal braces as {{{{ and }}}}"
            ) from None
        if "{trigger}" in text and not cfg.trigger:
            raise ValueError(
                f"caption.{key} {text!r} uses {{trigger}} but caption.trigger is unset"
            )
    uses = [
        k for k in ("instance_prompt", "caption_template") if "{trigger}" in (getattr(cfg, k) or "")
    ]
    if cfg.trigger and not uses:
        raise ValueError(
            f"caption.trigger is {cfg.trigger!r} but neither caption.instance_prompt nor "
            "caption.caption_template has a {trigger} placeholder to put it in"
        )
