"""Single-file checkpoints read in: a `.safetensors` (or a `.ckpt` that loads without unpickling
code) given as `model.pretrained`, with `model.config` naming the diffusers configs that describe it.

The file is read by diffusers' own `from_single_file` and saved once per file content as a diffusers
folder, `<workdir>/bases/<sha256>/`, that every stage then reads (`resolve_single_file_base`, called
at the start of a run): the stage keys hold the file's content hash through the folder's name and
content, and a single-file base trains exactly as the same weights in a folder. The family is the
one whose single-file text prefix the keys carry, and must be the config folder's.
"""

from __future__ import annotations

import hashlib
import inspect
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from sdflow.config.model import CHECKPOINT_SUFFIXES
from sdflow.errors import UserError
from sdflow.models.formats.single_file import UNET_PREFIX


def is_single_file(source: str | None) -> bool:
    """A model given as one weights file rather than a diffusers folder or a hub name."""
    return bool(source) and str(source).endswith(CHECKPOINT_SUFFIXES)


def checkpoint_keys(path: Path) -> list[str]:
    """The tensor names of a single-file checkpoint; a `.ckpt` only if it loads without running
    pickled code (`torch.load(weights_only=True)`), else a UserError that says so."""
    if not path.is_file():
        raise UserError(f"model.pretrained {path} is not a file.")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    try:
        state = torch.load(path, map_location="meta", weights_only=True, mmap=True)
    except Exception as exc:  # an UnpicklingError names the global it would have had to run
        raise UserError(
            f"model.pretrained {path} cannot be read without unpickling code, which sdflow refuses "
            f"(it could run anything): {str(exc).splitlines()[0]}. Convert it to .safetensors "
            "where you trust it, or ask its author for a .safetensors file."
        ) from None
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return [k for k, v in state.items() if isinstance(v, Tensor)]


def file_hash(path: Path) -> str:
    """sha256 of the file's bytes (cached by name, size and mtime)."""
    stat = path.stat()
    return _file_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=32)
def _file_hash(path: str, size: int, mtime: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def single_file_to_folder(path: Path, config: str, pipeline_class: type, out_dir: Path) -> None:
    """diffusers' own reader (`from_single_file` with the configs of `config`), saved as a
    diffusers folder into `out_dir` atomically."""
    from sdflow.models.files import save_pipeline_dir

    local = Path(config).expanduser().is_dir()
    kwargs = {"safety_checker": None} if "safety_checker" in _init_names(pipeline_class) else {}
    pipe = pipeline_class.from_single_file(
        str(path), config=str(Path(config).expanduser().resolve()) if local else config,
        local_files_only=local, **kwargs,
    )  # fmt: skip
    save_pipeline_dir(out_dir, pipe)


def _init_names(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters)


def detect_family(path: Path, keys: list[str]) -> str:
    """The family whose single-file layout the keys follow (each family names its text prefix)."""
    from sdflow.models.families import get_family

    if any(k.startswith(UNET_PREFIX) for k in keys):
        for name in ("sdxl", "sd"):
            if any(k.startswith(get_family(name).single_file_marker) for k in keys):
                return name
    prefixes = sorted({".".join(k.split(".")[:2]) for k in keys})[:8]
    raise UserError(
        f"model.pretrained {path}: its keys match no model family sdflow reads (found prefixes "
        f"{prefixes}). sdflow reads SD 1.x / 2.x checkpoints (model.diffusion_model.*, "
        "cond_stage_model.*) and SDXL ones (conditioner.embedders.*); give one of those, or a "
        "diffusers folder."
    )


def resolve_single_file_base(config: Any, workdir: str) -> Any:
    """The run's config with a single-file `model.pretrained` replaced by its diffusers folder:
    converted once per file content into `<workdir>/bases/<sha256>/`, so every stage reads a
    folder and every stage key holds the file's content hash (the folder is named by it)."""
    from sdflow.models.families import get_family

    model = config.model
    path = Path(model.pretrained).expanduser().resolve()
    found = check_single_file_base(model)
    out = Path(workdir).expanduser().resolve() / "bases" / file_hash(path)
    if not (out / "model_index.json").is_file():
        single_file_to_folder(path, model.config, get_family(found).pipeline_class, out)
    folder = model.model_copy(update={"pretrained": str(out), "config": None})
    return config.model_copy(update={"model": folder})


def check_single_file_base(model: Any) -> str:
    """The family of a single-file `model.pretrained`, from its key names only; it must be the
    family of the `model.config` folder that describes it."""
    from sdflow.models.families import pipeline_family

    path = Path(model.pretrained).expanduser().resolve()
    found = detect_family(path, checkpoint_keys(path))
    described = pipeline_family(model.config)
    if found != described:
        raise UserError(
            f"model.pretrained {path} is a {found!r} checkpoint but model.config {model.config} "
            f"describes a {described!r} pipeline: name a {found!r} diffusers folder as model.config."
        )
    return found
