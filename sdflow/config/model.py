"""The model's sections: `model`, `autoencoder`, `latents` (augmentation and buckets included)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from sdflow.config.base import TOKENIZER_BASE_VOCAB, Precision, Section

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # a single-file model


class ModelConfig(Section):
    """Which model components are trained or fine-tuned."""

    init: Literal["scratch", "pretrained"] = "scratch"
    family: Literal["sd", "sdxl", "sd3", "flux"] | None = Field(
        None,
        description="model family (sdflow.models.families): unset: from the pipeline's model_index.json "
        "(pretrained), sd from scratch; set with pretrained, it must match the pipeline",
    )
    pretrained: str | None = Field(
        None,
        description="diffusers pipeline directory or hub name, or a single .safetensors / .ckpt "
        "checkpoint in the original layout (then model.config names its configs)",
    )
    config: str | None = Field(
        None,
        description="with a single-file model.pretrained: the diffusers pipeline folder (or hub "
        "name) whose configs describe it, e.g. the base it was fine-tuned from",
    )
    revision: str | None = None
    variant: str | None = Field(None, description="weights variant of a hub model, e.g. fp16")
    allow_pickle_weights: bool = Field(
        False,
        description="load model weights stored only as pickles (.bin / .pt / .ckpt); a pickle can "
        "run code when loaded, so only for models from a source you trust. Off: safetensors only",
    )
    vae: str | None = Field(
        None, description="a VAE directory or hub name replacing the pipeline's"
    )
    unet: dict[str, Any] = Field(
        default_factory=dict, description="UNet2DConditionModel config (scratch only)"
    )
    vae_config: dict[str, Any] = Field(
        default_factory=dict, description="AutoencoderKL config (scratch only)"
    )
    text_encoder: dict[str, Any] = Field(
        default_factory=dict, description="CLIPTextConfig (scratch only)"
    )
    tokenizer_vocab_size: int = Field(
        1000,
        description=f"BPE vocabulary (scratch only): {TOKENIZER_BASE_VOCAB} for the special "
        "tokens, the 256 bytes and their word-final forms, the rest for learned merges",
    )
    max_token_length: int = Field(77, ge=4, le=512, description="tokenizer model_max_length")
    max_sequence_length: int | None = Field(
        None,
        ge=1,
        le=512,
        description="T5 tokens per caption (sd3, flux): unset: the pipeline's default (SD3 256, "
        "Flux 512); at most the T5 tokenizer's model_max_length",
    )
    quantize: Literal["none", "int8", "nf4", "fp8"] = Field(
        "none",
        description="LoRA runs (sd3, flux): the frozen transformer's weights in 8 bits (int8), 4 "
        "bits (nf4: bitsandbytes, CUDA only) or float8 (fp8), through diffusers' quantization "
        "backends (sdflow.models.quantize); the adapter trains in train.mixed_precision on top",
    )
    quantize_text_encoder: bool = Field(
        False,
        description="with model.quantize: T5 too is loaded quantized while the latents stage "
        "caches its states",
    )
    seed: int = Field(0, description="seed of the random initialisation")

    @field_validator("tokenizer_vocab_size")
    @classmethod
    def _room_for_merges(cls, value: int) -> int:
        if value <= TOKENIZER_BASE_VOCAB:
            raise ValueError(
                f"must be more than {TOKENIZER_BASE_VOCAB}: the start and end tokens, the 256 "
                "bytes and their 256 word-final forms take that many, and merges need the rest"
            )
        return value

    @model_validator(mode="after")
    def _init_needs_source(self) -> ModelConfig:
        if self.init == "pretrained" and not self.pretrained:
            raise ValueError("model.init is 'pretrained' but model.pretrained is not set")
        single = (self.pretrained or "").endswith(CHECKPOINT_SUFFIXES)
        if single and not self.config:
            raise ValueError(
                f"model.pretrained {self.pretrained!r} is a single file but model.config is not "
                "set: name the diffusers folder (or hub name) whose configs describe it"
            )
        if self.config and not single:
            raise ValueError(
                f"model.config is {self.config!r} but model.pretrained is not a single file: "
                "model.config describes a .safetensors checkpoint; unset it for a folder"
            )
        if self.quantize_text_encoder and self.quantize == "none":
            raise ValueError(
                "model.quantize_text_encoder is true but model.quantize is 'none': set "
                "model.quantize (int8, nf4, fp8) to the precision T5 is loaded in"
            )
        if self.init == "scratch" and self.family in ("sdxl", "sd3", "flux"):
            raise ValueError(
                f"model.family is {self.family!r} but model.init is 'scratch': it is fine-tuned "
                "from a pretrained pipeline (model.init: pretrained); allowed from scratch: 'sd'"
            )
        return self


class AugmentConfig(Section):
    """Random colour changes of autoencoder training images, so the VAE can learn to reconstruct
    colours, not only the few of its data (a later fine-tune may need purple). Drawn from the
    autoencoder's seeded generator; 0 switches a change off. Off by default: it needs more steps
    (tiny-cpu: hue 0.5 on half the images needs 1000 steps; at 600 even the data's own red and
    green came back off-hue)."""

    hue: float = Field(
        0.0,
        ge=0,
        le=0.5,
        description="hue rotated by a uniform amount in [-hue, hue] turns (0.5: every hue)",
    )
    saturation: float = Field(
        0.0, ge=0, lt=1, description="saturation scaled by a uniform factor in [1 - s, 1 + s]"
    )
    brightness: float = Field(
        0.0, ge=0, lt=1, description="brightness scaled by a uniform factor in [1 - b, 1 + b]"
    )
    probability: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of training images that are changed; the rest keep the data's own "
        "colours, which the autoencoder then learns as fast as without augmentation",
    )


class AutoencoderConfig(Section):
    """Training the VAE from scratch (only when there is no pretrained VAE)."""

    steps: int = Field(500, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0, le=1)
    kl_weight: float = Field(1e-6, ge=0, description="weight of the KL term (SD used 1e-6)")
    l1_weight: float = Field(0.0, ge=0, description="weight of an extra L1 reconstruction term")
    checkpoint_every: int = Field(100, ge=1)
    held_out: int = Field(
        64, ge=1, description="at most this many held-out images (eval split) measure the error"
    )
    scale_samples: int = Field(
        256, ge=1, description="training images whose latents set the VAE's scaling_factor"
    )
    seed: int = 0
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    unseen_samples: int = Field(
        32,
        ge=1,
        description="generated probe images (demo shapes in colours and a shape the demo data "
        "lacks) whose reconstruction error the manifest reports as unseen_colour_mse / "
        "unseen_shape_mse",
    )


BUCKET_MULTIPLE = 8  # every bucket side divides by the VAE's downsampling (8 in every SD VAE)


class BucketGrid(Section):
    """Buckets generated around a target area (`sdflow.data.buckets.grid_buckets`)."""

    resolution: int = Field(..., ge=8, le=4096, description="buckets hold at most this**2 pixels")
    min_side: int | None = Field(None, ge=8, description="shortest side; default resolution / 2")
    max_side: int | None = Field(None, ge=8, description="longest side; default resolution x 2")
    step: int = Field(
        64,
        ge=8,
        description="side increment in pixels; 64 = VAE 8x times the UNet's 8x downsampling of "
        "every Stable Diffusion (small models may use a multiple of 8 that their UNet divides)",
    )

    @property
    def min_side_or_default(self) -> int:
        return self.min_side or max(self.step, self.resolution // 2 // self.step * self.step)

    @property
    def max_side_or_default(self) -> int:
        return self.max_side or self.resolution * 2

    @model_validator(mode="after")
    def _sides(self) -> BucketGrid:
        if self.step % BUCKET_MULTIPLE:
            raise ValueError(
                f"latents.buckets.step = {self.step} is not a multiple of {BUCKET_MULTIPLE} (the "
                "VAE's downsampling); allowed: 8, 16, ..., 64 (the default)"
            )
        for key in ("min_side", "max_side"):
            value = getattr(self, key)
            if value is not None and value % self.step:
                raise ValueError(
                    f"latents.buckets.{key} = {value} is not a multiple of step {self.step}"
                )
        lo, hi = self.min_side_or_default, self.max_side_or_default
        if lo * lo > self.resolution**2 or lo > hi:
            raise ValueError(
                f"latents.buckets: min_side {lo}, max_side {hi} and resolution "
                f"{self.resolution} leave no bucket; allowed: min_side <= resolution <= max_side"
            )
        return self


def _check_bucket_list(buckets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    if not buckets:
        raise ValueError("latents.buckets is an empty list; allowed: 'none', a grid or [[w, h]]")
    for width, height in buckets:
        if width < 8 or height < 8 or width % BUCKET_MULTIPLE or height % BUCKET_MULTIPLE:
            raise ValueError(
                f"latents.buckets has [{width}, {height}]; allowed: sides of at least 8 that are "
                f"multiples of {BUCKET_MULTIPLE} (the VAE's downsampling)"
            )
    if len(set(buckets)) != len(buckets):
        raise ValueError(f"latents.buckets lists a bucket twice: {buckets}")
    return buckets


def _bucket_kind(value: Any) -> str | None:
    """Which form of `latents.buckets` a value is (one error message per form, not three)."""
    if isinstance(value, str):
        return "none"
    if isinstance(value, dict | BucketGrid):
        return "grid"
    return "list" if isinstance(value, list | tuple) else None


BucketSpec = Annotated[
    Annotated[Literal["none"], Tag("none")]
    | Annotated[BucketGrid, Tag("grid")]
    | Annotated[list[tuple[int, int]], Tag("list")],
    Discriminator(
        _bucket_kind,
        custom_error_type="bucket_spec",
        custom_error_message="latents.buckets must be 'none', a grid {resolution, min_side, "
        "max_side, step} or a list of [width, height]",
    ),
]


class LatentsConfig(Section):
    """Encoding images and captions once, into safetensors shards."""

    buckets: BucketSpec = Field(
        "none",
        description="aspect-ratio buckets: none (square centre crops at download.resolution), "
        "{resolution, min_side, max_side, step} (generated), or [[width, height], ...]",
    )

    batch_size: int = Field(64, ge=1)
    flip: bool = Field(True, description="also cache the horizontally flipped latents")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    mixed_precision: Precision = "no"
    shard_size: int = Field(1000, ge=1)
    channels_last: bool = Field(
        False, description="the VAE and its pixel batches in channels-last memory format (GPU)"
    )

    @model_validator(mode="after")
    def _bucket_list(self) -> LatentsConfig:
        if isinstance(self.buckets, list):
            _check_bucket_list(self.buckets)
        return self
