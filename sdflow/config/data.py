"""The data stages' sections: `source`, `download`, `filter`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sdflow.config.base import Section


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
        description="requests in flight to one host (across all shards of this process) at the "
        "start: the limit grows up to 8x for a host that answers fast while rows wait for it and "
        "shrinks while the host refuses, stalls or slows (sdflow.data.sources.hostgate)",
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
