"""One CLIP embedding pass, shared by the CLIP-score and LAION aesthetic filters.

With `filter.clip_score` or `filter.aesthetic` set, the filter stage first builds (or reuses) the
`clip` stage output: per download shard, each row's L2-normalised CLIP image embedding and caption
embedding (`filter.clip_model`, a hub name or local directory; `sdflow.models.clip` loads it),
row for row in input order (null where the image does not decode or there is no caption). It is a
content-addressed stage output like any other (keyed by the download output and the model's weights
hash) and records its rows (`sdflow.store.reuse`), so a grown dataset embeds only its new rows.

- `filter.clip_score: {min: 0.28}`: the cosine of the image and caption embeddings; reason
  `clip_score`. Rows without a caption are not scored (the caption rules judge those).
- `filter.aesthetic: {weights: head.safetensors, min: 5}`: a linear head (weight 1 x dim, bias 1)
  on the normalised image embedding, read with safetensors (no pickle); reason `aesthetic`.
"""

from __future__ import annotations

import hashlib
import io
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdflow.data.filters import BatchCheck, Rejection, Row, per_row, register
from sdflow.errors import UserError
from sdflow.store.fingerprint import code_version
from sdflow.store.reuse import Memo, Outcome, row_keys, write_outcomes
from sdflow.store.stageio import (
    Manifest,
    StageBuild,
    build_stage,
    load_manifest,
    shard_name,
    shard_paths,
    stage_dir,
    stage_key,
)

if TYPE_CHECKING:
    from sdflow.config import Bounds, FilterConfig, RunConfig

STAGE = "clip"
BATCH = 32
DECIMALS = 6
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image_embed", pa.list_(pa.float32())),
        ("text_embed", pa.list_(pa.float32())),
    ]
)
IMAGE, TEXT = "clip_image", "clip_text"  # the row fields the filter stage attaches


def clip_needed(cfg: FilterConfig) -> bool:
    wanted = (cfg.clip_score, cfg.aesthetic, cfg.semantic_dedup)
    return cfg.clip_model is not None and any(w is not None for w in wanted)


def clip_identity(cfg: FilterConfig) -> dict[str, str]:
    """The CLIP model's weights hash and the aesthetic head's file hash (for keys). Without a CLIP
    filter nothing is imported: `sdflow.models.components` brings torch and diffusers (seconds) into a filter
    stage that needs neither."""
    if not clip_needed(cfg):
        return {}
    from sdflow.models.components import absolute_source
    from sdflow.models.files import weights_hash

    found = {"clip_weights": weights_hash(absolute_source(cfg.clip_model), None)}
    if cfg.aesthetic:
        found["aesthetic_weights"] = _file_hash(cfg.aesthetic.weights)
        load_head(cfg.aesthetic.weights)  # a file that is no linear head fails before any work
    return found


def _file_hash(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()
    except OSError as exc:
        raise UserError(f"filter.aesthetic.weights {path!r} cannot be read: {exc}") from None


# ------------------------------------------------------------------------- the embedding stage


def embeddings_key(config: RunConfig, download: Manifest) -> str:
    settings = {"model": clip_identity(config.filter)["clip_weights"]}
    return stage_key(STAGE, settings, [download], code_version(__name__))


def clip_embeddings(config: RunConfig, download: Manifest, workdir: str | Path) -> Manifest:
    """Build (or reuse) the CLIP embeddings of every row of the download output."""
    key = embeddings_key(config, download)
    return build_stage(workdir, STAGE, key, lambda build: _embed_all(build, config, download))


def _embed_all(build: StageBuild, config: RunConfig, download: Manifest) -> Manifest:
    memo = Memo(build.workdir, STAGE, exclude=build.key)
    salt = stage_key(STAGE, clip_identity(config.filter), [], code_version(__name__))
    names, total, computed = [], 0, 0
    for index, path in enumerate(shard_paths(build.workdir, download)):
        names.append(shard_name(index))
        rows = pq.read_table(path, columns=["id", "image", "caption"]).to_pylist()
        total += len(rows)
        if build.has(names[-1]):
            continue  # written before a crash
        keys = row_keys(rows, salt)
        outcomes, fresh = memo.outcomes(keys, lambda todo, rows=rows: _embedded(rows, todo, config))
        write_outcomes(build, index, keys, outcomes, SCHEMA)
        computed += fresh
    counts = {"input": total, "kept": total, "failed": 0, "failed_by_reason": {}}
    info = {"model": config.filter.clip_model, "rows_computed": computed}
    return build.finish(counts=counts, shards=names, files={"failures": "failures"}, info=info)


def _embedded(rows: list[Row], todo: list[int], config: RunConfig) -> list[Outcome]:
    chosen = [rows[i] for i in todo]
    return [Outcome(True, row) for row in embed_rows(chosen, config.filter.clip_model or "")]


def embed_rows(rows: list[Row], model: str) -> list[dict[str, Any]]:
    """{id, image_embed, text_embed} per row: normalised float32 embeddings, None where missing."""
    from sdflow.ops.gpuslots import torch_device

    embedder = _embedder(model, str(torch_device()))
    images = {
        i: pixels for i, row in enumerate(rows) if (pixels := _pixels(row["image"])) is not None
    }
    texts = {i: row["caption"] for i, row in enumerate(rows) if (row["caption"] or "").strip()}
    image_embeds = _batched(embedder.images, images)
    text_embeds = _batched(embedder.texts, texts)
    return [
        {"id": row["id"], "image_embed": image_embeds.get(i), "text_embed": text_embeds.get(i)}
        for i, row in enumerate(rows)
    ]


def _batched(embed: Any, items: dict[int, Any]) -> dict[int, list[float]]:
    order = sorted(items)
    found: dict[int, list[float]] = {}
    for start in range(0, len(order), BATCH):
        chunk = order[start : start + BATCH]
        vectors = embed([items[i] for i in chunk]).float().numpy()
        found.update(zip(chunk, vectors.tolist(), strict=True))
    return found


def _pixels(data: bytes | None) -> Any:
    """The image as a uint8 CHW tensor; None when it does not decode."""
    import torch
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data or b"")) as image:
            array = np.asarray(image.convert("RGB"))
    except Exception:  # undecodable bytes: the decode check rejects the row
        return None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


@lru_cache(maxsize=2)
def _embedder(model: str, device: str) -> Any:
    import torch

    from sdflow.models.clip import ClipEmbedder

    return ClipEmbedder(model, torch.device(device))


def attach_embeddings(rows: list[Row], positions: list[int], shard: Path) -> list[Row]:
    """`rows` (the download shard's rows at `positions`) with their CLIP embeddings."""
    table = pq.read_table(shard).take(pa.array(positions, pa.int64())).to_pylist()
    for row, embedded in zip(rows, table, strict=True):
        if embedded["id"] != row["id"]:
            raise RuntimeError(f"CLIP shard {shard} is out of step at {row['id']!r}")
        row[IMAGE], row[TEXT] = embedded["image_embed"], embedded["text_embed"]
    return rows


def embeddings_shard(config: RunConfig, download_shard: str, index: int, workdir: Path) -> Path:
    """The CLIP shard for download shard `index` (the download manifest is in its folder)."""
    download = load_manifest(Path(download_shard).parent)
    if download is None:
        raise RuntimeError(f"no download manifest beside {download_shard}")
    return stage_dir(workdir, STAGE, embeddings_key(config, download)) / shard_name(index)


# ------------------------------------------------------------------------------- the filters


@register("clip", cost=1)
def clip_filters(cfg: FilterConfig) -> list[BatchCheck]:
    checks: list[BatchCheck] = []
    if cfg.clip_model and cfg.clip_score:
        checks.append(per_row(lambda row, b=cfg.clip_score: check_clip_score(row, b)))
    if cfg.clip_model and cfg.aesthetic:
        head = load_head(cfg.aesthetic.weights)
        checks.append(per_row(lambda row, a=cfg.aesthetic: check_aesthetic(row, a, head)))
    return checks


def check_clip_score(row: Row, bounds: Bounds) -> Rejection | None:
    if row.get(IMAGE) is None or row.get(TEXT) is None:
        return None
    cosine = round(float(np.dot(row[IMAGE], row[TEXT])), DECIMALS)
    return out_of_bounds("clip_score", "cosine", cosine, bounds)


def check_aesthetic(row: Row, bounds: Bounds, head: tuple[np.ndarray, float]) -> Rejection | None:
    if row.get(IMAGE) is None:
        return None
    score = round(float(np.dot(head[0], row[IMAGE]) + head[1]), DECIMALS)
    return out_of_bounds("aesthetic", "score", score, bounds)


def out_of_bounds(reason: str, name: str, value: float, bounds: Bounds) -> Rejection | None:
    if bounds.min is not None and value < bounds.min:
        return Rejection(reason, f"{name} {value:.{DECIMALS}f} < min {bounds.min:g}")
    if bounds.max is not None and value > bounds.max:
        return Rejection(reason, f"{name} {value:.{DECIMALS}f} > max {bounds.max:g}")
    return None


@lru_cache(maxsize=4)
def load_head(path: str) -> tuple[np.ndarray, float]:
    """The aesthetic head's weight vector and bias from a safetensors file (no pickle)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(Path(path).expanduser()))
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(
            f"filter.aesthetic.weights {path!r} is not a safetensors file: {exc}"
        ) from None
    weights = [t for t in tensors.values() if t.ndim == 2]
    biases = [t for t in tensors.values() if t.ndim == 1]
    if len(weights) != 1 or weights[0].shape[0] != 1 or len(biases) != 1 or biases[0].shape != (1,):
        shapes = {name: list(t.shape) for name, t in tensors.items()}
        raise UserError(
            f"filter.aesthetic.weights {path!r} must hold one linear layer: a weight of shape "
            f"[1, dim] and a bias of shape [1]; it holds {shapes}."
        )
    return weights[0][0].astype(np.float64), float(biases[0][0])
