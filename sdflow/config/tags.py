"""Tag-style captions and masked loss (`train.caption_shuffle`, `train.keep_tokens`,
`train.masked_loss`; issue 24 §3, §4). See docs/tags-and-masks.md."""

from __future__ import annotations

from pydantic import Field, model_validator

from sdflow.config.base import Section


class TagsAndMasks(Section):
    """The `train` keys of tag shuffling and masked loss (TrainConfig inherits them)."""

    caption_shuffle: bool = Field(
        False,
        description="shuffle each caption's comma-separated tags per sample and step (seeded: "
        "resume is exact); the text encoder then runs at every step on the shuffled caption",
    )
    keep_tokens: int = Field(
        0,
        ge=0,
        le=255,
        description="with caption_shuffle: the first keep_tokens tags stay in place (a trigger "
        "word, a class); kohya's keep_tokens",
    )
    masked_loss: bool = Field(
        False,
        description="the loss counts only where a mask says: NAME.mask.png beside each image "
        "(folder source) or the image's alpha channel; white counts, black does not",
    )

    @model_validator(mode="after")
    def _tags_and_masks(self):
        if self.keep_tokens and not self.caption_shuffle:
            raise ValueError(
                f"train.keep_tokens is {self.keep_tokens} but train.caption_shuffle is false: "
                "it says how many leading tags the shuffle keeps; set caption_shuffle: true or "
                "keep_tokens 0"
            )
        if self.masked_loss and not getattr(self, "cache_latents", True):
            raise ValueError(
                "train.masked_loss is true but train.cache_latents is false: the masks are "
                "cropped and downsampled beside the latents in the latents cache; set "
                "cache_latents: true"
            )
        return self
