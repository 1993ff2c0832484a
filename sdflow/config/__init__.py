"""The one typed configuration of an sdflow run.

YAML profiles in `profiles/` map onto `RunConfig` 1:1; `sdflow.profiles` loads them and applies
`--set key=value` overrides. Every section forbids unknown keys, so a typo fails before any work.
One module per group of sections: `data` (source, download, filter), `caption`, `model` (model,
autoencoder, latents), `train` (train, eval), `runner`; `base` holds what they share. `RunConfig`
and the checks that span sections are here.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from sdflow.config.base import TOKENIZER_BASE_VOCAB, Precision, Section
from sdflow.config.caption import EXTRA_MODULES, CaptionConfig, InterrogatorConfig
from sdflow.config.data import (
    AestheticFilter,
    Bounds,
    ClassifierFilter,
    DownloadConfig,
    FilterConfig,
    SemanticDedup,
    SourceConfig,
)
from sdflow.config.distributed import check_placement
from sdflow.config.model import (
    AugmentConfig,
    AutoencoderConfig,
    BucketGrid,
    LatentsConfig,
    ModelConfig,
)
from sdflow.config.prior import PriorPreservation, check_prior_preservation
from sdflow.config.runner import RunnerConfig
from sdflow.config.subsets import SubsetConfig, check_subsets
from sdflow.config.train import EvalConfig, FlowConfig, TrainConfig

__all__ = [
    "STAGES",
    "TOKENIZER_BASE_VOCAB",
    "AestheticFilter",
    "AugmentConfig",
    "AutoencoderConfig",
    "Bounds",
    "BucketGrid",
    "CaptionConfig",
    "ClassifierFilter",
    "DownloadConfig",
    "EXTRA_MODULES",
    "EvalConfig",
    "FilterConfig",
    "InterrogatorConfig",
    "LatentsConfig",
    "ModelConfig",
    "Precision",
    "PriorPreservation",
    "RunConfig",
    "RunnerConfig",
    "Section",
    "SemanticDedup",
    "SourceConfig",
    "SubsetConfig",
    "FlowConfig",
    "TrainConfig",
]

STAGES: tuple[str, ...] = (
    "download",
    "filter",
    "caption",
    "autoencoder",
    "class_images",
    "latents",
    "train",
    "evaluate",
)


class RunConfig(Section):
    """A whole run: one section per pipeline stage plus how to run it."""

    description: str = Field("", description="one line shown by `sdflow profiles`")
    source: SourceConfig | None = Field(None, description="where the samples come from")
    subsets: list[SubsetConfig] | None = Field(
        None, description="several sources instead of `source`, each with repeats or a weight"
    )
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    latents: LatentsConfig = Field(default_factory=LatentsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)

    @model_validator(mode="after")
    def _combinations(self) -> RunConfig:
        check_subsets(self.subsets, self.source, self.train.cache_latents)
        if self.runner.task_runner == "dask" and not self.runner.dask_address:
            raise ValueError("runner.task_runner is 'dask' but runner.dask_address is not set")
        if self.train.mode == "lora" and self.model.init == "scratch":
            raise ValueError("train.mode 'lora' needs model.init 'pretrained': LoRA adapts a model")
        _check_text_encoder(self)
        check_prior_preservation(self.train.prior_preservation, self.model.init)
        _check_quantize(self)
        _check_buckets(self)
        launcher = self.runner.train_launcher
        cluster = None if launcher == "local" else getattr(self.runner, launcher)
        check_placement(self.train.nodes, launcher, cluster)
        if self.train.validate_every and self.eval.held_out_fraction == 0:
            raise ValueError(
                f"train.validate_every is {self.train.validate_every} but eval.held_out_fraction "
                "is 0: there is no held-out split to validate on; raise it (e.g. 0.05)"
            )
        if self.eval.checkpoints == "best" and not self.train.keep_best:
            raise ValueError(
                "eval.checkpoints is 'best' but train.keep_best is false: only a run that "
                "validates and keeps its best checkpoint has a best model; set train.keep_best: "
                "true and train.validate_every to a number of steps, or eval.checkpoints to "
                "'final' or 'all'"
            )
        return self

    def needs_autoencoder(self) -> bool:
        """The VAE is trained only when neither a pretrained pipeline nor a VAE is given."""
        return self.model.init == "scratch" and self.model.vae is None


def _check_text_encoder(config: RunConfig) -> None:
    """`train.text_encoder` trains only a pretrained encoder, exported the way its UNet is."""
    train = config.train
    choice = train.text_encoder
    if choice == "frozen":
        return
    if config.model.init == "scratch":
        raise ValueError(
            f"train.text_encoder is {choice!r} but model.init is 'scratch': a from-scratch run's "
            "text encoder stays frozen at its seeded initialisation (its embeddings are cached); "
            "allowed with scratch: 'frozen'. Train it in a fine-tune (model.init: pretrained)."
        )
    if choice != train.mode:
        raise ValueError(
            f"train.text_encoder is {choice!r} but train.mode is {train.mode!r}: the export is one "
            "pipeline directory (mode full) or one LoRA file (mode lora), so allowed with mode "
            f"{train.mode!r}: 'frozen' or {train.mode!r}"
        )
    if not train.cache_latents:
        raise ValueError(
            f"train.text_encoder is {choice!r} but train.cache_latents is false: a trained text "
            "encoder reads the token ids the latents stage caches; allowed with cache_latents "
            "false: 'frozen'"
        )


def _check_quantize(config: RunConfig) -> None:
    """A quantized base stays frozen: only a LoRA trains on top of it."""
    quantize = config.model.quantize
    if quantize != "none" and config.train.mode != "lora":
        raise ValueError(
            f"model.quantize is {quantize!r} but train.mode is {config.train.mode!r}: quantized "
            "weights cannot be trained, only an adapter on top of them; use train.mode 'lora' "
            "or model.quantize 'none' (see profile flux-dev-finetune-80gb for a full fine-tune)"
        )


def _check_buckets(config: RunConfig) -> None:
    """Buckets need images that kept their aspect ratio, and the latent cache."""
    if config.latents.buckets == "none":
        return
    mode = config.download.resize_mode
    if mode == "center_crop":
        raise ValueError(
            "latents.buckets is set but download.resize_mode is 'center_crop': every image is "
            "already square; allowed with buckets: 'max_area' (recommended), 'keep_ratio', 'none'"
        )
    if not config.train.cache_latents:
        raise ValueError(
            "latents.buckets is set but train.cache_latents is false: encoding at every step "
            "reads square crops only; allowed with cache_latents false: buckets 'none'"
        )
