"""Model directories on disk: written atomically and byte-reproducibly (safetensors, sorted headers, no
load paths), and hashed by content for stage keys (a hub name hashes as its resolved commit)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from diffusers import StableDiffusionPipeline
from diffusers.models.modeling_utils import ModelMixin
from transformers import PreTrainedModel

from sdflow.config import ModelConfig
from sdflow.errors import UserError
from sdflow.models.components import is_hub_name
from sdflow.models.hub import resolve_commit
from sdflow.store.fingerprint import hash_weights
from sdflow.store.stageio import atomic_dir, write_atomic


def save_component(component: Any, out_dir: Path) -> None:
    """save_pretrained into `out_dir` atomically, as safetensors."""
    with atomic_dir(out_dir) as tmp:
        if isinstance(component, (ModelMixin, PreTrainedModel)):
            component.save_pretrained(tmp, safe_serialization=True)
        else:
            component.save_pretrained(tmp)
        drop_load_paths(tmp)


def save_pipeline(out_dir: Path, unet, vae, text_encoder, tokenizer, scheduler) -> None:
    """A complete diffusers pipeline dir, loadable by `StableDiffusionPipeline.from_pretrained`."""
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_pipeline_dir(out_dir, pipeline)


def save_pipeline_dir(out_dir: Path, pipeline: Any) -> None:
    """`pipeline.save_pretrained` into `out_dir` atomically, as safetensors, without load paths."""
    with atomic_dir(out_dir) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        drop_load_paths(tmp)


def canonical_safetensors(path: Path) -> None:
    """Rewrite a safetensors file's header with sorted keys (the tensor data is untouched).

    safetensors writes `__metadata__` in hash order, and a LoRA file's adapter config lists its
    target modules in set order: two saves of the same adapter differ in bytes, and so would the
    stage fingerprint. Sorted, the same weights and config are always the same file.
    """
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    metadata = header.get("__metadata__") or {}
    for name, value in metadata.items():
        metadata[name] = _sorted_json(value)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section stays 8-byte aligned
    write_atomic(path, len(text).to_bytes(8, "little") + text + raw[8 + size :])


def _sorted_json(value: str) -> str:
    """A JSON text (an adapter config) with sorted keys and its module lists sorted; else as is."""
    try:
        parsed = json.loads(value)
    except ValueError:
        return value
    if not isinstance(parsed, dict):
        return value
    for name, item in parsed.items():
        if name.endswith(("target_modules", "exclude_modules")) and isinstance(item, list):
            parsed[name] = sorted(item)
    return json.dumps(parsed, sort_keys=True, indent=2)


def drop_load_paths(directory: Path) -> None:
    """Remove `_name_or_path` (where a component was loaded from) from saved diffusers configs.

    It names a local directory, often another stage's output: a saved model that records it differs
    between two workdirs, and the stage fingerprint would cover a path instead of the content.
    """
    for config in Path(directory).rglob("config.json"):
        values = json.loads(config.read_text())
        if isinstance(values, dict) and "_name_or_path" in values:
            del values["_name_or_path"]
            config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def hub_commit(model: ModelConfig) -> str | None:
    """The commit `model.pretrained` resolves to, when it is a hub name (recorded in manifests)."""
    if model.pretrained and is_hub_name(model.pretrained):
        return resolve_commit(model.pretrained, model.revision)
    return None


def weights_hash(source: str, subfolder: str | None, revision: str | None = None) -> str:
    """Content hash of a local model directory; `hub:<name>@<commit>` for a hub name (the commit
    `revision` resolves to now: a new upstream commit is a new key)."""
    if is_hub_name(source):
        commit = resolve_commit(source, revision)
        return f"hub:{source}@{commit}" + (f"/{subfolder}" if subfolder else "")
    path = Path(source).expanduser() / (subfolder or "")
    if not path.is_dir():
        raise UserError(f"Model directory {path} does not exist.")
    return _hash_weights_cached(str(path.resolve()), _stat_signature(path))


def _stat_signature(path: Path) -> tuple:
    """Cheap (name, size, mtime) listing: re-hashing gigabytes happens only when a file changed."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return tuple((p.relative_to(path).as_posix(), *_size_mtime(p)) for p in files)


def _size_mtime(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@lru_cache(maxsize=64)
def _hash_weights_cached(path: str, signature: tuple) -> str:
    return hash_weights(path)
