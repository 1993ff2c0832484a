"""The `subsets` section: several sources in one run, each with its own data stages and its share of
the training order (kohya's `num_repeats`, or a sampling weight)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from sdflow.config.base import Section
from sdflow.config.caption import CaptionConfig
from sdflow.config.data import SourceConfig

# what a subset may set of the caption stage: the per-source parts (a trigger word, a template)
SUBSET_CAPTION_KEYS = ("prefix", "suffix", "template", "on_missing")


class SubsetCaption(Section):
    """Caption settings of one subset; unset keys take the profile's `caption` section's value."""

    prefix: str | None = Field(None, description="caption.prefix for this subset, e.g. 'sks, '")
    suffix: str | None = Field(None, description="caption.suffix for this subset")
    template: str | None = Field(
        None, min_length=1, description="caption.template for this subset's rows without caption"
    )
    on_missing: Literal["fail", "template"] | None = Field(
        None, description="caption.on_missing for this subset: fail or template"
    )


class SubsetConfig(Section):
    """One source of the training set, its data stages cached on their own key."""

    name: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="unique name: shown as download[NAME], ... and prefixed to its sample ids",
    )
    source: SourceConfig = Field(..., description="this subset's source, as the `source` section")
    caption: SubsetCaption = Field(
        default_factory=SubsetCaption, description="this subset's caption prefix, suffix, template"
    )
    repeats: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="times each image appears per epoch (kohya's repeats); default 1",
    )
    weight: float | None = Field(
        None,
        gt=0,
        description="sampling share instead of repeats: batches draw subsets in proportion "
        "to their weights (every subset then needs one)",
    )

    @model_validator(mode="after")
    def _repeats_or_weight(self) -> SubsetConfig:
        if self.repeats is not None and self.weight is not None:
            raise ValueError(
                f"subset {self.name!r} sets repeats ({self.repeats}) and weight ({self.weight}); "
                "allowed: one of them (repeats: how often each image appears per epoch; weight: "
                "a sampling share)"
            )
        return self

    def caption_section(self, caption: CaptionConfig) -> CaptionConfig:
        """The profile's caption section with this subset's settings over it."""
        changes = self.caption.model_dump(exclude_none=True)
        return caption.model_validate({**caption.model_dump(), **changes}) if changes else caption


def check_subsets(subsets: list[SubsetConfig] | None, source: Any, cache_latents: bool) -> None:
    """`subsets` or `source`, never both; unique names; repeats and weights not mixed; the
    latent cache (its ids carry each sample's subset)."""
    if subsets is None:
        if source is None:
            raise ValueError("source: required, but missing (or give `subsets`: a list of sources)")
        return
    if source is not None:
        raise ValueError(
            "source and subsets are both set; allowed: one of them (move the source into "
            "`subsets` as {name: ..., source: {...}}, or remove `subsets`)"
        )
    if not subsets:
        raise ValueError("subsets = []: give at least one subset, or use `source`")
    names = [s.name for s in subsets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"subsets: duplicate name(s) {repeated}; allowed: unique names")
    if not cache_latents:
        raise ValueError(
            "subsets is set but train.cache_latents is false; allowed with subsets: "
            "cache_latents true (the training order reads each sample's subset from the cache)"
        )
    weighted = [s.name for s in subsets if s.weight is not None]
    if weighted and len(weighted) != len(subsets):
        others = [s.name for s in subsets if s.weight is None]
        raise ValueError(
            f"subsets {weighted} set a weight but {others} do not; allowed: a weight on every "
            "subset (sampling shares), or on none (repeats, default 1)"
        )


def subset_view(config: Any, subset: SubsetConfig) -> Any:
    """The run config a subset's data stages see: its source and caption settings in place of the
    profile's, no `subsets` (so its keys are those of a one-source profile with these settings)."""
    caption = subset.caption_section(config.caption)
    return config.model_copy(update={"source": subset.source, "subsets": None, "caption": caption})


@dataclass(frozen=True)
class SubsetPlan:
    """How the train stage samples the subsets: repeats per subset, or sampling weights."""

    names: tuple[str, ...]
    repeats: tuple[int, ...] | None  # None: weights
    weights: tuple[float, ...] | None  # None: repeats

    def settings(self) -> dict[str, Any]:
        """Each subset's name with its repeats or weight (in the train stage's key)."""
        shares = self.repeats if self.weights is None else self.weights
        kind = "repeats" if self.weights is None else "weight"
        return {name: {kind: value} for name, value in zip(self.names, shares, strict=True)}


def subset_plan(config: Any) -> SubsetPlan | None:
    """The profile's sampling plan; None without `subsets`."""
    if not config.subsets:
        return None
    names = tuple(s.name for s in config.subsets)
    if config.subsets[0].weight is not None:
        return SubsetPlan(names, None, tuple(s.weight for s in config.subsets))
    return SubsetPlan(names, tuple(s.repeats or 1 for s in config.subsets), None)
