"""The memory a flow profile's training state needs on its GPU, from the real transformer built on the
meta device (`python bench/gpu_step.py --profile flux-dev-finetune-80gb --build-only` prints it).

Counted: the frozen or trained weights as the profile stores them (`model.quantize`: nf4 ~0.52 byte
per linear weight with bitsandbytes' double-quantized absmax, int8 / fp8 1 byte; the rest in the
compute dtype), the trained weights' float32 master copy (mixed precision: float32 weights; a LoRA's
adapter is float32; `train.master_weights: bfloat16` has none), their gradients (the trained
weights' dtype) and the optimizer's state (AdamW: two float32 moments; Adafactor: factored float32
second moments, rows + columns per matrix; 8-bit AdamW: two bytes). Not counted: activations
(gradient checkpointing keeps each block's input, then recomputes one block at a time), the CUDA
context and allocator slack, a few GB together at 1024 px and batch 1.
"""

from __future__ import annotations

from math import prod

import torch

GB = 1e9
# bitsandbytes NF4, blocks of 64 with double quantization: 4 bits, an 8-bit absmax per block and a
# float32 constant per 256 blocks (QLoRA, Dettmers et al. 2023: 0.127 bits per parameter of constants)
QUANTIZED_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0, "fp8": 1.0}


def build(class_name: str, architecture: dict, config) -> torch.nn.Module:
    """The transformer on the meta device, with the profile's LoRA adapter when it trains one."""
    import diffusers

    from sdflow.models.adapters import adapter_config

    with torch.device("meta"):
        model = getattr(diffusers, class_name)(**architecture)
        if config.train.mode == "lora":
            model.requires_grad_(False)
            model.add_adapter(adapter_config(config.train, list(config.train.lora_targets)))
    return model


def state_bytes(config, model: torch.nn.Module) -> dict[str, float]:
    """GB of each part of the training state (see the module docstring)."""
    train, quantize = config.train, config.model.quantize
    compute = 2 if train.mixed_precision in ("bf16", "fp16") else 4
    frozen = trained = 0.0
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        linear = param.ndim == 2 and name.endswith(".weight") and quantize != "none"
        frozen += param.numel() * (QUANTIZED_BYTES[quantize] if linear else compute)
    params = [p for p in model.parameters() if p.requires_grad]
    count = sum(p.numel() for p in params)
    bf16_master = train.master_weights == "bfloat16"
    trained = count * (2 if bf16_master else 4)
    return {
        "trained_params": count,
        "frozen_weights_gb": frozen / GB,
        "trained_weights_gb": trained / GB,
        "gradients_gb": trained / GB,
        "optimizer_state_gb": optimizer_bytes(train.optimizer, params) / GB,
        "total_gb": (frozen + 2 * trained + optimizer_bytes(train.optimizer, params)) / GB,
    }


def optimizer_bytes(optimizer: str, params: list) -> float:
    if optimizer == "adafactor":  # transformers' Adafactor: no first moment, factored if 2-D+
        return sum(4 * (prod(p.shape[:-1]) + prod(p.shape[:-2]) * p.shape[-1] if p.ndim >= 2
                        else p.numel()) for p in params)  # fmt: skip
    per_weight = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}[optimizer]
    return per_weight * sum(p.numel() for p in params)
