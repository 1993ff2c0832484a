"""Quantized frozen bases (`model.quantize`): a LoRA trained on top of 8-bit, 4-bit or float8 weights.

A LoRA run never changes its base's weights, so the base may be stored coarser than the adapter: the
transformer is loaded through one of diffusers' quantization backends and the adapter's own weights
train in float32 under `train.mixed_precision`. The export is the adapter alone, which loads onto the
unquantized base with `load_lora_weights` (export and evaluation build the base unquantized).

| `model.quantize` | backend | weights | runs on |
|---|---|---|---|
| `int8` | torchao `Int8WeightOnlyConfig` (per-channel absmax int8) | 1 byte | CPU and CUDA |
| `fp8` | torchao `Float8WeightOnlyConfig` (e4m3, per-channel scale) | 1 byte | CPU and CUDA |
| `nf4` | bitsandbytes 4-bit NormalFloat, double quantization | ~0.5 byte | CUDA only |

torchao's int8 and fp8 run the same code on a CPU and a GPU, so what `make test` checks here is the
path a GPU takes; diffusers loads a torchao-quantized model's remaining (unquantized) weights in
bfloat16 whatever `train.mixed_precision` says. `model.quantize_text_encoder` loads T5 the same way
while the latents stage caches its states. Packages: torchao (extra `quantize`), bitsandbytes
(extra `gpu`); a missing one, or nf4 on a host without CUDA, is refused before any work.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from sdflow.config import RunConfig
from sdflow.errors import UserError

PACKAGES = {"int8": ("torchao", "quantize"), "fp8": ("torchao", "quantize"),
            "nf4": ("bitsandbytes", "gpu")}  # fmt: skip


def check_quantize(config: RunConfig, cuda: bool | None = None) -> None:
    """Refuse, before any work, a `model.quantize` this host or this model cannot run."""
    choice = config.model.quantize
    if choice == "none":
        return
    package, extra = PACKAGES[choice]
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if choice == "nf4" and not cuda:
        raise UserError(
            "model.quantize is 'nf4' (bitsandbytes' 4-bit NormalFloat), which needs a CUDA GPU, "
            "and this host has none: run it on a CUDA host with bitsandbytes installed "
            "(pip install -e '.[gpu]'), or use model.quantize 'int8' or 'fp8' (torchao, runs here)."
        )
    if importlib.util.find_spec(package) is None:
        raise UserError(
            f"model.quantize is {choice!r} but {package} is not installed: "
            f"pip install -e '.[{extra}]' (or pip install {package}), or set model.quantize 'none'."
        )
    from sdflow.models.families import family_of

    family = family_of(config)
    if family.objective != "flow":
        raise UserError(
            f"model.quantize is {choice!r} but the model is a {family.name!r} pipeline: quantized "
            "bases are supported for the sd3 and flux transformers; use model.quantize 'none'."
        )


def quantize_backend(choice: str) -> dict[str, str | None]:
    """The package that quantizes `choice` and its major.minor version (for the stage keys)."""
    from sdflow.store.fingerprint import library_version

    package = PACKAGES[choice][0]
    return {package: library_version(package)}


def denoiser_quantization(config: RunConfig, dtype: torch.dtype) -> Any | None:
    """diffusers' quantization config of the frozen transformer; None: unquantized."""
    import diffusers

    return _quantization(config, dtype, diffusers)


def text_quantization(config: RunConfig, dtype: torch.dtype | None) -> Any | None:
    """transformers' quantization config of T5 (`model.quantize_text_encoder`); None: unquantized."""
    if not config.model.quantize_text_encoder:
        return None
    import transformers

    return _quantization(config, dtype or torch.float32, transformers)


def _quantization(config: RunConfig, dtype: torch.dtype, library: Any) -> Any | None:
    """The `BitsAndBytesConfig` / `TorchAoConfig` of `model.quantize` in `library` (diffusers or
    transformers, whose classes share these names and arguments)."""
    choice = config.model.quantize
    if choice == "none":
        return None
    check_quantize(config)
    if choice == "nf4":
        return library.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    weights = Int8WeightOnlyConfig() if choice == "int8" else Float8WeightOnlyConfig()
    return library.TorchAoConfig(weights)


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether diffusers or transformers loaded `model` through a quantization backend."""
    return getattr(model, "hf_quantizer", None) is not None or bool(
        getattr(model, "is_quantized", False)
    )
