"""The latent cache's file format, and the datasets the train stage reads.

A latents shard is one safetensors file: tensors `mean`, `std` [N, C, h, w] (the VAE's latent
distribution, unscaled), optionally `mean_flip`, `std_flip` (the horizontally flipped image) and
`text` [N, L, D] (the caption's embedding) or, for a run that trains the text encoder,
`input_ids` [N, L] (the caption's token ids, int64); for SDXL also `pooled` [N, P] (the pooled
text projection); with the N sample ids in the metadata (`ids`, a JSON
list) in row order. Ids travel with every row, so a latent is never paired with another sample's
caption however the rows are shuffled. Every row also has `original_size` [N, 2] (height, width of
the source image before the download resized it) and `crop_top_left` [N, 2] (top, left of the crop
in the image resized to cover its bucket), int64, for SDXL's size and crop conditioning. With
`train.masked_loss` every row has `mask` [N, 1, h, w] (its loss weights at latent size, an image
tensor like `mean`), and with `train.caption_shuffle` the training shards keep their captions
beside them (`captions-XXXXX.json`, as held-out shards do; see `sdflow.training.tag_shuffle`).

With aspect-ratio buckets (`latents.buckets`) a shard's rows have several shapes: `bucket` [N, 2]
(width, height in pixels, int64) names each row's bucket, and the image tensors are stored per
bucket as `mean@WxH`, `std@WxH`, ... with that bucket's rows in row order (safetensors holds one
shape per tensor). Row order, ids and every other tensor are as without buckets, so readers stay
lazy (a row is still one read per tensor) and the reuse records' positions stay valid. Writer and
readers live here together so the format is defined once.
"""

from __future__ import annotations

import json
import os
import uuid
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset

from sdflow.config import TrainConfig
from sdflow.models.components import image_to_tensor
from sdflow.store.splits import is_held_out
from sdflow.store.stageio import Manifest, output_dir, publish, shard_paths

# stored per bucket when bucketed; `mask` [N, 1, h, w]: train.masked_loss's loss weights
IMAGE_KEYS = ("mean", "std", "mean_flip", "std_flip", "mask")
# `pooled`: SDXL's pooled text projection [N, P]
ROW_KEYS = ("text", "input_ids", "pooled", "original_size", "crop_top_left")
LATENT_KEYS = (*IMAGE_KEYS, *ROW_KEYS)
EMPTY_PROMPT = "empty_prompt.safetensors"
CACHED_TABLES = 8  # caption shards `CaptionedImages` keeps decoded in memory
# a latents cache at most this large on disk is held in memory while training (per data worker)
RESIDENT_BYTES = 512 * 2**20


def caption_key(train: TrainConfig) -> str:
    """What a row caches of its caption: the embedding `text` while the text encoder is frozen,
    the token ids `input_ids` when it trains (it must see them at every step)."""
    return "text" if train.text_encoder == "frozen" else "input_ids"


def latent_shard_name(index: int) -> str:
    return f"latents-{index:05d}.safetensors"


def save_tensors(path: str | Path, tensors: Mapping[str, Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically: temp file, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    save_file(_unshared(tensors), str(tmp), metadata=metadata)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    publish(tmp, path)


def _unshared(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors with storage of their own (safetensors refuses shared memory)."""
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        value = value.contiguous()
        if value.numel() and value.untyped_storage().data_ptr() in seen:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out


def write_latent_shard(path: str | Path, tensors: Mapping[str, Tensor], ids: list[str]) -> None:
    """Write one shard; `ids` name the tensors' rows, in order (per-bucket `@` tensors: the rows
    of their bucket)."""
    rows = {len(t) for k, t in tensors.items() if "@" not in k}
    if rows - {len(ids)}:
        raise ValueError(f"every tensor needs one row per id ({len(ids)}), got row counts {rows}")
    save_tensors(path, tensors, {"ids": json.dumps(ids)})


def pack_rows(rows: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """One-row tensors (dicts {name: [1, ...]}, one per row, in row order) -> a shard's tensors;
    image tensors of bucketed rows (with `bucket`) go into per-bucket `name@WxH` tensors."""
    if not rows:
        return {"text": torch.empty(0)}
    tensors = {k: torch.cat([r[k] for r in rows]) for k in rows[0] if k not in IMAGE_KEYS}
    if "bucket" not in rows[0]:
        return tensors | {k: torch.cat([r[k] for r in rows]) for k in rows[0] if k in IMAGE_KEYS}
    groups: dict[str, list[dict[str, Tensor]]] = {}
    for row in rows:
        groups.setdefault(bucket_suffix(row["bucket"][0]), []).append(row)
    for suffix, members in groups.items():
        tensors |= {
            k + suffix: torch.cat([r[k] for r in members]) for k in IMAGE_KEYS if k in rows[0]
        }
    return tensors


def bucket_suffix(bucket: Tensor) -> str:
    """`@WxH` for a bucket tensor (width, height)."""
    width, height = bucket.tolist()
    return f"@{width}x{height}"


def bucket_positions(buckets: Tensor | None, rows: int) -> tuple[list[str], list[int]]:
    """Each row's image-tensor suffix ("" without buckets) and position within its bucket."""
    if buckets is None:
        return [""] * rows, list(range(rows))
    suffixes = [bucket_suffix(b) for b in buckets]
    seen: dict[str, int] = {}
    positions = []
    for suffix in suffixes:
        positions.append(seen.get(suffix, 0))
        seen[suffix] = positions[-1] + 1
    return suffixes, positions


class ShardRows:
    """A whole shard read into memory, as rows {id, tensor name: one-row tensor} by position
    (plain names: `mean`, not `mean@WxH`); what the latents stage reuses."""

    def __init__(self, path: str | Path):
        self.ids, self.tensors = read_latent_shard(path)
        self.suffixes, self.positions = bucket_positions(self.tensors.get("bucket"), len(self.ids))

    def __getitem__(self, position: int) -> dict[str, Any]:
        row: dict[str, Any] = {"id": self.ids[position]}
        suffix, at = self.suffixes[position], self.positions[position]
        for key, value in self.tensors.items():
            if "@" not in key:
                row[key] = value[position : position + 1]
            elif key.endswith(suffix):
                row[key.split("@")[0]] = value[at : at + 1]
        return row


def captions_path(shard: str | Path) -> Path:
    """A held-out shard's sidecar of captions (`captions-XXXXX.json`, one per row, in order).

    Not in the shard's metadata: safetensors writes metadata keys in no fixed order, and a second
    key would make the file's bytes (and the stage fingerprint) differ between identical runs.
    """
    shard = Path(shard)
    return shard.with_name(
        shard.name.replace("latents-", "captions-").replace(".safetensors", ".json")
    )


def read_shard_captions(path: str | Path) -> list[str]:
    """The captions of a held-out shard's rows."""
    return json.loads(captions_path(path).read_text())


def read_latent_shard(path: str | Path) -> tuple[list[str], dict[str, Tensor]]:
    """A whole shard: its ids and tensors (one row per id)."""
    return read_shard_ids(path), load_file(str(path))


def read_shard_ids(path: str | Path) -> list[str]:
    """The ids of a shard's rows, from its header only (no tensor data is read)."""
    with safe_open(str(path), framework="pt") as fh:
        return json.loads(fh.metadata()["ids"])


def load_empty_prompts(workdir: str | Path, manifest: Manifest) -> dict[str, Tensor]:
    """Every cached tensor of the empty caption, for caption dropout: `text` [L, D] (or, when the
    text encoder trains, `input_ids` [L]) and for SDXL `pooled` [P]."""
    path = output_dir(workdir, manifest) / manifest["files"]["empty_prompt"]
    return load_file(str(path))


class CachedLatents(Dataset):
    """The latents stage's shards as one dataset of rows {id, mean, std, mean_flip, std_flip, text,
    input_ids, original_size, crop_top_left} (None where the cache has no such tensor); a bucketed
    row's image tensors have its bucket's shape.

    Shards are opened lazily (memory-mapped, a row is read on demand) and the most recently used
    stay open with their tensors' slice handles, so a row is one read per tensor. A cache of at
    most `resident_bytes` on disk (a fine-tune's few hundred images) is read whole into memory
    instead, a shard at first use: a row is then indexing, not one file read per tensor (0.29 ms
    of reads per row at 32 px, 4.6 ms of a batch of 16: `bench/train_step.py`).
    """

    def __init__(
        self,
        workdir: str | Path,
        manifest: Manifest,
        open_shards: int = 32,
        resident_bytes: int = RESIDENT_BYTES,
    ):
        self.paths = shard_paths(workdir, manifest)
        self.resident = sum(os.path.getsize(p) for p in self.paths) <= resident_bytes
        rows = manifest.get("info", {}).get("rows_per_shard")
        if rows is None or len(rows) != len(self.paths):
            rows = [len(read_shard_ids(p)) for p in self.paths]
        self.starts = [0]
        for n in rows:
            self.starts.append(self.starts[-1] + n)
        self.open_shards = open_shards
        self._open: OrderedDict[int, tuple[dict[str, Any], list[str]]] = OrderedDict()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} cached latents")
        shard = bisect_right(self.starts, index) - 1
        slices, ids, (suffixes, positions) = self._shard(shard)
        row = index - self.starts[shard]
        item: dict[str, Any] = {"id": ids[row]}
        for key in LATENT_KEYS:
            name, at = (key + suffixes[row], positions[row]) if key in IMAGE_KEYS else (key, row)
            item[key] = slices[name][at : at + 1][0] if name in slices else None
        return item

    def buckets(self) -> list[str]:
        """Each row's bucket (`@WxH`; "" for every row of a cache without buckets)."""
        out: list[str] = []
        for path in self.paths:
            with safe_open(str(path), framework="pt") as fh:
                rows = len(json.loads(fh.metadata()["ids"]))
                has = "bucket" in fh.keys()  # noqa: SIM118
                out += bucket_positions(fh.get_tensor("bucket") if has else None, rows)[0]
        return out

    def _shard(self, shard: int) -> tuple[dict[str, Any], list[str], tuple[list[str], list[int]]]:
        """The shard's slice handle per tensor (the file stays open through them), its ids and
        each row's bucket suffix and position in its bucket's tensors."""
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        handle = safe_open(str(self.paths[shard]), framework="pt")
        if self.resident:  # every tensor read now; the rows slice them in memory
            slices = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        else:
            slices = {key: handle.get_slice(key) for key in handle.keys()}  # noqa: SIM118
        ids = json.loads(handle.metadata()["ids"])
        buckets = handle.get_tensor("bucket") if "bucket" in slices else None
        entry = (slices, ids, bucket_positions(buckets, len(ids)))
        self._open[shard] = entry
        while not self.resident and len(self._open) > self.open_shards:
            self._open.popitem(last=False)
        return entry

    def __getstate__(self) -> dict[str, Any]:
        # open file handles do not cross into DataLoader worker processes; each reopens its own
        return {**self.__dict__, "_open": OrderedDict()}


def held_out_latents(workdir: str | Path, manifest: Manifest) -> CachedLatents | None:
    """The held-out split the latents stage cached under `files["validation"]`, or None."""
    folder = manifest.get("files", {}).get("validation")
    if not folder:
        return None
    base = output_dir(workdir, manifest)
    names = sorted(
        p.relative_to(base).as_posix() for p in (base / folder).glob("latents-*.safetensors")
    )
    return CachedLatents(workdir, {**manifest, "shards": names, "info": {}})


class CaptionedImages(Dataset):
    """Caption-stage shards (training split only) as rows {id, pixels [-1, 1], caption}.

    For training without the latent cache (`train.cache_latents: false`): images are decoded and
    resized here, then encoded by the VAE at every step.
    """

    def __init__(
        self,
        workdir: str | Path,
        manifest: Manifest,
        resolution: int,
        held_out_fraction: float,
    ):
        self.paths = shard_paths(workdir, manifest)
        self.resolution = resolution
        self.rows: list[tuple[int, int]] = []  # (shard, row) of every training sample
        for shard, path in enumerate(self.paths):
            ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
            self.rows += [
                (shard, r) for r, i in enumerate(ids) if not is_held_out(i, held_out_fraction)
            ]
        self._cached: OrderedDict[int, dict[str, list]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, row = self.rows[index]
        table = self._table(shard)
        return {
            "id": table["id"][row],
            "pixels": image_to_tensor(table["image"][row], self.resolution),
            "caption": table["caption"][row] or "",
        }

    def _table(self, shard: int) -> dict[str, list]:
        """The `CACHED_TABLES` most recently used shards stay in memory: the training order is a
        global shuffle, so a batch's rows come from several shards."""
        if shard in self._cached:
            self._cached.move_to_end(shard)
        else:
            table = pq.read_table(self.paths[shard], columns=["id", "image", "caption"])
            self._cached[shard] = table.to_pydict()
            while len(self._cached) > CACHED_TABLES:
                self._cached.popitem(last=False)
        return self._cached[shard]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cached": OrderedDict()}
