"""Generative caption backends of the caption stage (`caption.backend`), and what they share.

`blip.py`: BLIP / BLIP-2 through transformers, batched. `interrogator.py`: clip-interrogator on top
of it (optional `caption` extra, imported only when that backend is built). `random_init.py`:
randomly initialised models saved like pretrained ones, for offline tests and `bench/caption.py`.

torch and `sdflow.models.components` (diffusers) are imported only when a model is involved: the caption stage
with the `keep` backend needs neither, and importing them takes seconds (tens under load).
"""

from __future__ import annotations

from importlib.util import find_spec
from typing import TYPE_CHECKING

from sdflow.config import EXTRA_MODULES, CaptionConfig
from sdflow.errors import UserError
from sdflow.ops.gpuslots import torch_device

if TYPE_CHECKING:
    import torch

INSTALL_EXTRA = "pip install -e '.[caption]'"


def select_device() -> torch.device:
    return torch_device()  # the GPU slot's device, when the caption stage holds one


def select_dtype(name: str, device: torch.device) -> torch.dtype:
    """`caption.dtype`; auto: float16 on a GPU (half the memory, tensor cores), float32 on CPU."""
    import torch

    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def require_backend(cfg: CaptionConfig) -> None:
    """Fail before any work when the backend's optional dependencies are not installed."""
    missing = [m for m in EXTRA_MODULES.get(cfg.backend, ()) if find_spec(m) is None]
    if missing:
        raise UserError(
            f"caption.backend {cfg.backend!r} needs the optional caption extra, and "
            f"{', '.join(missing)} is not installed. Install it with: {INSTALL_EXTRA}"
        )


def captioner_identity(cfg: CaptionConfig) -> dict[str, str]:
    """The models and data a backend captions with: a hub name@revision or a content hash.

    Part of the caption stage key, so another model (or new weights in the same directory)
    re-captions, while the model name alone never reruns anything upstream.
    """
    if cfg.backend == "keep":
        return {}
    from sdflow.models.files import weights_hash

    identity = {"model": weights_hash(cfg.model, None, cfg.revision)}
    if cfg.backend == "clip-interrogator":
        from sdflow.data.captioners.interrogator import clip_identity, terms_identity

        identity["clip_model"] = clip_identity(cfg.interrogator.clip_model)
        identity["terms"] = terms_identity(cfg.interrogator.data_path)
    return identity
