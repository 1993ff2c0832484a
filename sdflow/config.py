"""The one typed configuration of an sdflow run.

YAML profiles in `profiles/` map onto `RunConfig` 1:1; `sdflow.profiles` loads them and applies
`--set key=value` overrides. Every section forbids unknown keys, so a typo fails before any work.
"""

from __future__ import annotations

import ipaddress
import re
from importlib.util import find_spec
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

# A from-scratch tokenizer's fixed tokens: start and end of text, 256 bytes, 256 word-final bytes.
TOKENIZER_BASE_VOCAB = 2 + 2 * 256

# YAML reads a bare `no` as False; accept it as the "no" it means.
Precision = Annotated[
    Literal["no", "fp16", "bf16"], BeforeValidator(lambda v: "no" if v is False else v)
]


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(Section):
    """Where the raw samples come from."""

    kind: Literal["urls", "hf", "folder", "webdataset"] = Field(
        "folder",
        description="urls: a URL list file; hf: a datasets name or local dir; folder: images; "
        "webdataset: local tar shards (img2dataset / DataComp layout)",
    )
    path: str = Field(
        ...,
        min_length=1,
        description="URL-list file, dataset name/dir, folder, or tar shards (a .tar, a directory, "
        "a glob or a brace range such as data/{00000..00099}.tar)",
    )
    url_column: str | None = Field(None, description="URL column; default accepts `url` or `URL`")
    caption_column: str | None = Field(
        None,
        description="caption column; default accepts `caption`, `TEXT` or `text` (webdataset: "
        "the `txt` member first; set, a field of the sample's json / shard parquet)",
    )
    image_column: str = Field("image", description="image column of an `hf` dataset")
    id_column: str | None = Field(None, description="column with stable sample ids, if any")
    split: str = Field("train", description="split of an `hf` dataset")
    revision: str | None = Field(
        None, description="hub revision (branch, tag or commit) of an `hf` dataset; pin it"
    )
    limit: int | None = Field(None, ge=1, description="use only the first N source rows")
    metadata_columns: list[str] | None = Field(
        None,
        description="urls / webdataset: metadata fields carried to the shards' `metadata` column "
        "(JSON) for filters; default: those of similarity, pwatermark, punsafe, AESTHETIC_SCORE, "
        "original_width, original_height, ... that the source has",
    )

    @model_validator(mode="after")
    def _metadata_needs_a_table(self) -> SourceConfig:
        if self.metadata_columns is not None and self.kind not in ("urls", "webdataset"):
            raise ValueError(
                f"source.metadata_columns is set but source.kind is {self.kind!r}; "
                "only 'urls' and 'webdataset' sources carry metadata columns"
            )
        return self


class DownloadConfig(Section):
    """Fetching, decoding and resizing the source images into shards."""

    resolution: int = Field(64, ge=8, le=4096, description="target side length in pixels")
    resize_mode: Literal["center_crop", "keep_ratio", "max_area", "none"] = Field(
        "center_crop",
        description="center_crop: a resolution-sized square; keep_ratio: longer side at most "
        "resolution; max_area: at most resolution**2 pixels, aspect kept (for latents.buckets); "
        "none: as downloaded. keep_ratio and max_area never upscale",
    )
    allow_private_network: bool = Field(
        False, description="allow URLs that resolve to private, loopback or link-local addresses"
    )
    timeout_s: float = Field(
        10.0, gt=0, le=600, description="connect / read timeout; a whole attempt gets 3x this"
    )
    retries: int = Field(2, ge=0, le=10, description="retries on 5xx, 429 and timeouts")
    backoff_s: float = Field(0.5, ge=0, le=60, description="first retry delay, doubled each retry")
    max_bytes: int = Field(
        20_000_000, ge=1024, description="largest accepted image (response body or file), decoded"
    )
    max_pixels: int = Field(
        89_478_485,
        ge=64,
        le=89_478_485,
        description="decompression-bomb limit: images declaring more pixels are refused before "
        "decoding (at most Pillow's own limit, 89,478,485)",
    )
    concurrency: int = Field(64, ge=1, le=4096, description="simultaneous HTTP connections")
    per_host_connections: int = Field(
        16,
        ge=1,
        le=4096,
        description="most requests in flight to one host, across all shards of this process; "
        "halved while the host refuses or stalls connects",
    )
    connect_retries: int = Field(
        3, ge=0, le=20, description="tries again after a refused or timed-out connect, per row"
    )
    decode_workers: int = Field(0, ge=0, le=256, description="0 = one per CPU core")
    shard_size: int = Field(1000, ge=1, le=1_000_000, description="samples per output shard")
    image_format: Literal["jpeg", "png", "webp"] = "png"
    quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality")
    user_agent: str = "sdflow/0.1 (+https://github.com/sdflow/sdflow)"


class Bounds(Section):
    """Inclusive bounds on a measured value: rows below `min` or above `max` are rejected."""

    min: float | None = Field(None, description="lowest value kept")
    max: float | None = Field(None, description="highest value kept")

    @model_validator(mode="after")
    def _some_bound(self) -> Bounds:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class ClassifierFilter(Bounds):
    """A transformers image-classification model whose probability for `label` must lie within
    [min, max] (`filter.classifiers` entries)."""

    model: str = Field(..., min_length=1, description="hub name or local model directory")
    label: str = Field(..., min_length=1, description="one of the model's id2label names")
    min: float | None = Field(None, ge=0.0, le=1.0, description="lowest probability kept")
    max: float | None = Field(None, ge=0.0, le=1.0, description="highest probability kept")
    batch_size: int = Field(32, ge=1, description="images per forward pass")


class AestheticFilter(Bounds):
    """The LAION aesthetic predictor: a linear head on the normalized CLIP image embedding."""

    weights: str = Field(
        ..., min_length=1, description="safetensors file with the head's weight (1 x dim) and bias"
    )


class SemanticDedup(Section):
    """Semantic deduplication on CLIP image embeddings (`filter.semantic_dedup`)."""

    epsilon: float = Field(
        ..., ge=0.0, lt=1.0, description="rows with cosine >= 1 - epsilon to a kept row are dropped"
    )


class FilterConfig(Section):
    """Which downloaded samples are good enough to train on."""

    min_size: int = Field(0, ge=0, description="minimum shorter side of the ORIGINAL image, px")
    max_aspect_ratio: float = Field(3.0, ge=1.0, description="max long side / short side")
    dedup: bool = Field(True, description="drop exact duplicates by image content hash")
    min_caption_words: int = Field(
        1, ge=0, description="captions with fewer words are rejected (0 and 0 chars: optional)"
    )
    min_caption_chars: int = Field(1, ge=0, description="shorter captions are rejected")
    max_caption_chars: int = Field(1000, ge=1, description="longer captions are rejected")
    metadata: dict[str, Bounds] = Field(
        default_factory=dict,
        description="bounds on fields of the source's metadata column, e.g. "
        "{similarity: {min: 0.28}, punsafe: {max: 0.5}}",
    )
    metadata_missing: Literal["keep", "reject"] = Field(
        "keep", description="rows without a numeric value for a bounded metadata field"
    )
    near_dup_distance: int | None = Field(
        None,
        ge=0,
        le=16,
        description="reject near-duplicates whose 64-bit perceptual hashes differ in at most this "
        "many bits (first in dataset order kept); unset: off",
    )
    classifiers: list[ClassifierFilter] = Field(
        default_factory=list,
        description="image-classification models as filters: [{model, label, max or min}]",
    )
    clip_model: str | None = Field(
        None,
        min_length=1,
        description="CLIPModel (hub name or local directory) whose one embedding pass serves "
        "clip_score and aesthetic",
    )
    clip_score: Bounds | None = Field(
        None, description="bounds on the cosine of image and caption embeddings, e.g. {min: 0.28}"
    )
    aesthetic: AestheticFilter | None = Field(
        None, description="LAION aesthetic predictor: {weights: head.safetensors, min: 5.0}"
    )
    semantic_dedup: SemanticDedup | None = Field(
        None, description="drop near-identical images by CLIP embedding: {epsilon: 0.05}"
    )

    @model_validator(mode="after")
    def _clip_model_given(self) -> FilterConfig:
        for name in ("clip_score", "aesthetic", "semantic_dedup"):
            if getattr(self, name) is not None and self.clip_model is None:
                raise ValueError(
                    f"filter.{name} needs filter.clip_model (a CLIPModel hub name or directory)"
                )
        return self

    @model_validator(mode="after")
    def _caption_bounds(self) -> FilterConfig:
        if self.min_caption_chars > self.max_caption_chars:
            raise ValueError(
                f"min_caption_chars ({self.min_caption_chars}) must not exceed "
                f"max_caption_chars ({self.max_caption_chars})"
            )
        return self


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
        missing = [m for m in EXTRA_MODULES.get(self.backend, ()) if find_spec(m) is None]
        if missing:
            raise ValueError(
                f"caption.backend {self.backend!r} needs the optional caption extra "
                f"({', '.join(missing)} not installed): pip install -e '.[caption]'"
            )
        return self


class ModelConfig(Section):
    """Which model components are trained or fine-tuned."""

    init: Literal["scratch", "pretrained"] = "scratch"
    family: Literal["sd", "sdxl"] | None = Field(
        None,
        description="model family (sdflow.families): unset: from the pipeline's model_index.json "
        "(pretrained), sd from scratch; set with pretrained, it must match the pipeline",
    )
    pretrained: str | None = Field(None, description="diffusers pipeline directory or hub name")
    revision: str | None = None
    variant: str | None = Field(None, description="weights variant of a hub model, e.g. fp16")
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
        if self.init == "scratch" and self.family == "sdxl":
            raise ValueError(
                "model.family is 'sdxl' but model.init is 'scratch': SDXL is fine-tuned from a "
                "pretrained pipeline (model.init: pretrained); allowed from scratch: 'sd'"
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
    """Buckets generated around a target area (`sdflow.buckets.grid_buckets`)."""

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


LrSchedule = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]
POLYNOMIAL_LR_END = 1e-7  # diffusers' get_scheduler decays `polynomial` to this lr


class TrainConfig(Section):
    """UNet training: from scratch, full fine-tune, or LoRA."""

    mode: Literal["full", "lora"] = "full"
    lr: float = Field(1e-4, gt=0, le=1)
    batch_size: int = Field(
        16,
        ge=1,
        description="samples per process and micro-batch; the global batch is batch_size x "
        "processes x gradient_accumulation",
    )
    max_steps: int = Field(1000, ge=1)
    checkpoint_every: int = Field(250, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    lr_scheduler: LrSchedule = Field(
        "constant",
        description="diffusers lr schedule; every one but `constant` starts with `warmup_steps` "
        "of linear warmup from 0",
    )
    warmup_steps: int = Field(0, ge=0, description="needs a schedule with warmup (not constant)")
    lr_cycles: int = Field(1, ge=1, description="hard restarts of cosine_with_restarts")
    lr_power: float = Field(1.0, gt=0, description="power of the polynomial decay (1: linear)")
    mixed_precision: Precision = "no"
    gradient_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = Field(0.9999, gt=0, lt=1)
    snr_gamma: float | None = Field(None, gt=0, description="min-SNR weighting gamma, e.g. 5.0")
    noise_offset: float = Field(0.0, ge=0, le=1)
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None,
        description="unset: the pretrained model's own (its scheduler config), epsilon from "
        "scratch; set to something else than the base's only to re-target it (logged, recorded)",
    )
    caption_dropout: float = Field(0.0, ge=0, le=1)
    use_flipped: bool = Field(True, description="sample flipped latents when cached")
    cache_latents: bool = Field(True, description="false: encode with VAE/text encoder every step")
    lora_rank: int = Field(4, ge=1)
    lora_alpha: float | None = Field(None, gt=0, description="default: equal to lora_rank")
    lora_targets: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_encoder: Literal["frozen", "lora", "full"] = Field(
        "frozen",
        description="fine-tunes only: frozen (its embeddings are cached), lora (rank lora_rank on "
        "its attention projections; needs mode lora) or full (needs mode full); a trained encoder "
        "runs at every step on cached token ids",
    )
    text_encoder_lr: float | None = Field(
        None, gt=0, le=1, description="the text encoder's lr when it trains; default: train.lr"
    )
    adam_weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    log_every: int = Field(10, ge=1)
    processes: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1,
        description="1: train in the stage's process; more: `accelerate launch` that many "
        "(one per GPU, or gloo on CPU); auto: one per visible GPU",
    )
    data_workers: int = Field(
        0, ge=0, le=64, description="DataLoader worker processes; 0 loads in the training process"
    )
    pin_memory: bool = Field(
        False, description="DataLoader pinned host memory (faster copies to a GPU; none on CPU)"
    )
    prefetch_factor: int | None = Field(
        None,
        ge=1,
        le=64,
        description="batches each DataLoader worker loads ahead; needs data_workers",
    )
    channels_last: bool = Field(
        False,
        description="UNet weights and inputs in channels-last memory format (GPU tensor cores)",
    )
    attention: Literal["default", "sdpa", "eager"] = Field(
        "default",
        description="UNet attention processor: default (as loaded), sdpa (PyTorch "
        "scaled_dot_product_attention, AttnProcessor2_0) or eager (plain matmul and softmax)",
    )
    fused_adamw: bool | None = Field(
        None,
        description="torch's fused AdamW kernel (one kernel over all weights); unset: fused where "
        "torch has the kernel for the device, else foreach; true: fused or refuse; adamw only",
    )
    tf32: bool = Field(
        False, description="TF32 matmuls and convolutions on CUDA (Ampere or newer); no-op on CPU"
    )
    compile: bool = Field(False, description="torch.compile the UNet (inductor; slow first steps)")

    validate_every: int = Field(
        0,
        ge=0,
        description="steps between validations (held-out loss and sample grid); 0: none. Needs "
        "held-out samples (eval.held_out_fraction > 0) and cache_latents",
    )
    validation_samples: int = Field(
        64, ge=1, description="held-out rows (in cache order) the validation loss averages over"
    )
    validation_prompts: list[str] = Field(
        default_factory=list, description="prompts of the validation grid; empty: held-out captions"
    )
    validation_images: int = Field(
        4, ge=0, description="held-out captions in the grid when validation_prompts is empty"
    )
    validation_inference_steps: int = Field(
        10, ge=1, description="sampler steps per validation image (kept low: it runs often)"
    )
    keep_best: bool = Field(
        False,
        description="keep the checkpoint of the lowest validation loss and export it as the "
        "model (the last one is exported beside it)",
    )
    early_stop_patience: int | None = Field(
        None, ge=1, description="stop after this many validations without a lower loss"
    )
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="adamw8bit: bitsandbytes' 8-bit AdamW, CUDA only (extra 'gpu')"
    )
    ema_on_cpu: bool = Field(
        False, description="keep the EMA weights in CPU memory (saves GPU memory, costs copies)"
    )
    keep_optimizer_state: bool = Field(
        False,
        description="false: the finished stage's checkpoint keeps weights, EMA, step, lr schedule "
        "and random state (enough to train on) but not the optimizer moments (2x the trained "
        "weights); checkpoints during training always hold them, for exact resume",
    )

    @model_validator(mode="after")
    def _checkpoint_fits(self) -> TrainConfig:
        if self.warmup_steps > self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})"
            )
        if self.lr_scheduler == "constant" and self.warmup_steps > 0:
            # diffusers' constant schedule ignores num_warmup_steps: refuse, never drop it silently
            raise ValueError(
                f"train.lr_scheduler 'constant' has no warmup, but train.warmup_steps is "
                f"{self.warmup_steps}: use lr_scheduler 'constant_with_warmup' (or another of "
                f"{', '.join(get_args(LrSchedule)[1:])}), or warmup_steps 0"
            )
        for key in ("keep_best", "early_stop_patience"):
            if getattr(self, key) not in (None, False) and not self.validate_every:
                raise ValueError(
                    f"train.{key} is {getattr(self, key)!r} but train.validate_every is 0: both "
                    "act on validations, so set validate_every to a number of steps"
                )
        text_encoder = getattr(self, "text_encoder", "frozen")  # train.text_encoder (issue 8 §5)
        if self.validate_every and text_encoder != "frozen":
            raise ValueError(
                f"train.validate_every is {self.validate_every} but train.text_encoder is "
                f"{text_encoder!r}: validation reads the frozen encoder's cached caption embeddings, "
                "so it is not available yet while the text encoder trains; set validate_every 0"
            )
        if self.validate_every and not self.cache_latents:
            raise ValueError(
                f"train.validate_every is {self.validate_every} but train.cache_latents is false: "
                "validation reads the held-out rows the latents stage caches; set cache_latents"
            )
        if self.prefetch_factor is not None and not self.data_workers:
            raise ValueError(
                f"train.prefetch_factor is {self.prefetch_factor} but train.data_workers is 0: "
                "only worker processes load ahead; set data_workers >= 1 or unset prefetch_factor"
            )
        if self.fused_adamw and self.mixed_precision == "fp16":
            raise ValueError(
                "train.fused_adamw is true but train.mixed_precision is 'fp16': the fused kernel "
                "skips inf/NaN steps out of accelerate's sight, so the lr schedule and EMA would "
                "not wait; leave fused_adamw unset (foreach under fp16) or use bf16"
            )
        if self.fused_adamw and self.optimizer != "adamw":
            raise ValueError(
                f"train.fused_adamw is true but train.optimizer is {self.optimizer!r}: the fused "
                "kernel is torch's AdamW; use optimizer 'adamw' or fused_adamw false"
            )
        if self.lr_scheduler == "polynomial" and self.lr <= POLYNOMIAL_LR_END:
            raise ValueError(
                f"train.lr_scheduler 'polynomial' decays to {POLYNOMIAL_LR_END}, so train.lr "
                f"({self.lr}) must be larger than that"
            )
        return self


class EvalConfig(Section):
    """Sampling and metrics after training."""

    held_out_fraction: float = Field(
        0.05, ge=0, lt=1, description="share of samples (by id) kept out of training, for FID"
    )
    prompts: list[str] = Field(default_factory=list, description="empty: held-out captions")
    num_prompts: int = Field(16, ge=1, description="held-out captions to use when prompts is empty")
    images_per_prompt: int = Field(1, ge=1, description="grid columns per model and prompt")
    seed: int = Field(0, description="image j of prompt i is sampled with seed + i*1000 + j")
    num_inference_steps: int = Field(25, ge=1)
    guidance_scale: float = Field(5.0, ge=0, description="classifier-free guidance; <= 1: none")
    scheduler: Literal["ddim", "ddpm", "euler", "dpm"] = Field(
        "ddim", description="sampler: DDIM, DDPM, Euler, or DPM-Solver++ (multistep)"
    )
    fid_features: Literal["inception", "random-cnn"] = Field(
        "inception",
        description="inception: standard FID (torch-fidelity weights in the torch hub cache); "
        "random-cnn: offline, comparable only between sdflow runs",
    )
    fid_samples: int = Field(256, ge=2, description="generated and real images compared by FID")
    clip_model: str | None = Field(
        None, description="CLIP model directory or hub name for CLIPScore; unset: no CLIP score"
    )
    batch_size: int = Field(32, ge=1, description="images generated per pipeline call")
    baseline: bool = Field(
        True,
        description="also evaluate the starting model (scored once per base model and eval "
        "settings, in stages/baseline/, and reused)",
    )
    nearest_k: int = Field(
        5, ge=1, description="k of the k-nearest-neighbour precision/recall/density/coverage"
    )
    checkpoints: Literal["final", "best", "all"] = Field(
        "final",
        description="final: score the last training step's model (with train.keep_best its "
        "final-pipeline/final-lora); best: the lowest-validation-loss checkpoint's model "
        "(needs train.keep_best); all: final and every checkpoint the train stage kept, with a "
        "metric-vs-step curve",
    )


class RunnerConfig(Section):
    """How Prefect runs the stages."""

    task_runner: Literal["threads", "processes", "dask"] = Field(
        "threads",
        description="where the data stages' shard tasks run: threads of the stage's process, "
        "max_workers worker processes of this host (for CPU-bound shards, e.g. long URL lists: "
        "one interpreter lock each), or the Dask cluster at dask_address (pip install -e '.[dask]')",
    )
    max_workers: int = Field(
        4,
        ge=1,
        le=256,
        description="threads or processes of this host; shards in flight at a time (all runners)",
    )
    dask_address: str | None = Field(
        None,
        description="Dask scheduler address (task_runner: dask): tls://HOST:8786, or tcp:// on "
        "loopback (tcp://127.0.0.1:8786); other addresses need allow_insecure_dask",
    )
    allow_insecure_dask: bool = Field(
        False,
        description="allow a dask_address that is neither tls:// nor loopback: anyone who reaches "
        "an unencrypted scheduler can run code on its workers",
    )
    result_storage: str | None = Field(None, description="Prefect result storage; default workdir")

    @model_validator(mode="after")
    def _dask_is_private(self) -> RunnerConfig:
        address = self.dask_address
        if address and not self.allow_insecure_dask and not _private_dask(address):
            raise ValueError(
                f"runner.dask_address = {address!r} is neither tls:// nor a loopback address, so "
                "anyone on the network could read the data and run code on the workers. Allowed: "
                "tls://HOST:PORT, or tcp://127.0.0.1:PORT, tcp://localhost:PORT, tcp://[::1]:PORT; "
                "or set runner.allow_insecure_dask: true on a network you trust."
            )
        return self


def _private_dask(address: str) -> bool:
    """A TLS scheduler address, or any scheme on this machine's loopback interface."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")  # Dask's default
    if parts.scheme == "tls":
        return True
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


STAGES: tuple[str, ...] = (
    "download",
    "filter",
    "caption",
    "autoencoder",
    "latents",
    "train",
    "evaluate",
)


class RunConfig(Section):
    """A whole run: one section per pipeline stage plus how to run it."""

    description: str = Field("", description="one line shown by `sdflow profiles`")
    source: SourceConfig
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
        if self.runner.task_runner == "dask" and not self.runner.dask_address:
            raise ValueError("runner.task_runner is 'dask' but runner.dask_address is not set")
        if self.train.mode == "lora" and self.model.init == "scratch":
            raise ValueError("train.mode 'lora' needs model.init 'pretrained': LoRA adapts a model")
        _check_text_encoder(self)
        _check_buckets(self)
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
