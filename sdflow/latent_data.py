"""The latent cache's file format, and the datasets the train stage reads.

A latents shard is one safetensors file: tensors `mean`, `std` [N, C, h, w] (the VAE's latent
distribution, unscaled), optionally `mean_flip`, `std_flip` (the horizontally flipped image) and
`text` [N, L, D] (the caption's embedding) or, for a run that trains the text encoder,
`input_ids` [N, L] (the caption's token ids, int64); for SDXL also `pooled` [N, P] (the pooled
text projection); with the N sample ids in the metadata (`ids`, a JSON
list) in row order. Ids travel with every row, so a latent is never paired with another sample's
caption however the rows are shuffled. Writer and readers live here together so the format is
defined once.
"""

from __future__ import annotations

import json
import os
import uuid
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from sdflow.config import TrainConfig
from sdflow.models import image_to_tensor
from sdflow.splits import is_held_out
from sdflow.stageio import Manifest, output_dir, publish, shard_paths

# `pooled`: SDXL's pooled text projection [N, P]; `original_size` / `crop_top_left` [N, 2] int64:
# the source image's (h, w) and the crop's (top, left), when the latents stage records them
LATENT_KEYS = ("mean", "std", "mean_flip", "std_flip", "text", "input_ids", "pooled",
               "original_size", "crop_top_left")  # fmt: skip
EMPTY_PROMPT = "empty_prompt.safetensors"


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
    """Write one shard; `ids` name the tensors' rows, in order."""
    rows = {len(t) for t in tensors.values()}
    if rows - {len(ids)}:
        raise ValueError(f"every tensor needs one row per id ({len(ids)}), got row counts {rows}")
    save_tensors(path, tensors, {"ids": json.dumps(ids)})


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


def load_empty_prompt(workdir: str | Path, manifest: Manifest, key: str = "text") -> Tensor:
    """The empty caption's embedding [L, D] (or, key `input_ids`, its token ids [L]; `pooled`,
    SDXL's pooled projection [P]), used for caption dropout."""
    return load_empty_prompts(workdir, manifest)[key]


def load_empty_prompts(workdir: str | Path, manifest: Manifest) -> dict[str, Tensor]:
    """Every cached tensor of the empty caption."""
    path = output_dir(workdir, manifest) / manifest["files"]["empty_prompt"]
    return load_file(str(path))


class CachedLatents(Dataset):
    """The latents stage's shards as one dataset of rows {id, mean, std, mean_flip, std_flip, text,
    input_ids} (None where the cache has no such tensor).

    Shards are opened lazily (memory-mapped, a row is read on demand) and the few most recently
    used stay open with their tensors' slice handles, so shard-local access costs no reopening and
    a row is one read per tensor.
    """

    def __init__(self, workdir: str | Path, manifest: Manifest, open_shards: int = 4):
        self.paths = shard_paths(workdir, manifest)
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

    def shard_ranges(self) -> list[range]:
        """Row index range of each shard (for shard-local shuffling)."""
        return [range(a, b) for a, b in zip(self.starts, self.starts[1:], strict=False)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} cached latents")
        shard = bisect_right(self.starts, index) - 1
        slices, ids = self._shard(shard)
        row = index - self.starts[shard]
        item: dict[str, Any] = {"id": ids[row]}
        for key in LATENT_KEYS:
            item[key] = slices[key][row : row + 1][0] if key in slices else None
        return item

    def _shard(self, shard: int) -> tuple[dict[str, Any], list[str]]:
        """The shard's slice handle per tensor (the file stays open through them), and its ids."""
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        handle = safe_open(str(self.paths[shard]), framework="pt")
        slices = {key: handle.get_slice(key) for key in handle.keys()}  # noqa: SIM118
        entry = (slices, json.loads(handle.metadata()["ids"]))
        self._open[shard] = entry
        while len(self._open) > self.open_shards:
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
        self.ranges: list[range] = []
        for shard, path in enumerate(self.paths):
            ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
            start = len(self.rows)
            self.rows += [
                (shard, r) for r, i in enumerate(ids) if not is_held_out(i, held_out_fraction)
            ]
            self.ranges.append(range(start, len(self.rows)))
        self._cached: tuple[int, dict[str, list]] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def shard_ranges(self) -> list[range]:
        return list(self.ranges)

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, row = self.rows[index]
        table = self._table(shard)
        return {
            "id": table["id"][row],
            "pixels": image_to_tensor(table["image"][row], self.resolution),
            "caption": table["caption"][row] or "",
        }

    def _table(self, shard: int) -> dict[str, list]:
        """The most recently used shard stays in memory: shard-local access reads each file once."""
        if self._cached is None or self._cached[0] != shard:
            table = pq.read_table(self.paths[shard], columns=["id", "image", "caption"])
            self._cached = (shard, table.to_pydict())
        return self._cached[1]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cached": None}


class ShardShuffleSampler(Sampler[int]):
    """Random order that visits shards in random order and rows within a shard in random order.

    Reads stay shard-local (fast with the caches above) while every epoch is a fresh permutation;
    `set_epoch` changes the order the same way on every process.
    """

    def __init__(self, ranges: list[range], seed: int = 0):
        self.ranges = [r for r in ranges if len(r)]
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(r) for r in self.ranges)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        for shard in torch.randperm(len(self.ranges), generator=generator).tolist():
            rows = self.ranges[shard]
            for offset in torch.randperm(len(rows), generator=generator).tolist():
                yield rows[offset]
