"""Adapters: LoRA and the variants fine-tuners reach for, all through PEFT (`train.lora_type`).

- `lora`: the low-rank pair B·A (rank `train.lora_rank`, scale `lora_alpha / rank`).
- `dora`: LoRA with DoRA's per-output magnitude vector (weight-decomposed LoRA, Liu et al. 2024,
  https://arxiv.org/abs/2402.09353); PEFT's `LoraConfig(use_dora=True)`.
- `lokr`: a Kronecker product of two factors (LyCORIS' LoKr, PEFT's `LoKrConfig`).
- `loha`: a Hadamard product of two low-rank pairs (LyCORIS' LoHa, PEFT's `LoHaConfig`).

Where they go: `lora` and `dora` are written in the diffusers format that `load_lora_weights` reads
(the adapter config in the file's metadata, so DoRA comes back as DoRA and alpha as alpha).
diffusers' LoRA loader reads LoRA layers only, so `lokr` and `loha` are written in PEFT's own
format, one folder per trained module (`unet/`, `text_encoder/`, `text_encoder_2/`, each with
`adapter_config.json` and `adapter_model.safetensors`), which `load_adapters` (PEFT's
`inject_adapter_in_model` + `set_peft_model_state_dict`) puts back onto a pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import (
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file, save_file

from sdflow.config import TrainConfig
from sdflow.errors import UserError

DIFFUSERS_FORMAT = ("lora", "dora")  # the types diffusers' load_lora_weights reads
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PIPELINE_PARTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
PEFT_PREFIX = "base_model.model."  # the key prefix `PeftModel.save_pretrained` writes


def adapter_config(train: TrainConfig, targets: list[str]) -> PeftConfig:
    """The PEFT config of `train.lora_type` on `targets` (rank `lora_rank`, `lora_alpha`)."""
    rank, alpha = train.lora_rank, train.lora_alpha or train.lora_rank
    if train.lora_type in DIFFUSERS_FORMAT:
        return LoraConfig(
            r=rank,
            lora_alpha=alpha,
            init_lora_weights="gaussian",
            target_modules=targets,
            use_dora=train.lora_type == "dora",
        )
    if train.lora_type == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, target_modules=targets)
    return LoHaConfig(r=rank, alpha=alpha, target_modules=targets)


def in_diffusers_format(train: TrainConfig) -> bool:
    return train.lora_type in DIFFUSERS_FORMAT


def save_peft_adapters(out_dir: Path, modules: dict[str, torch.nn.Module]) -> None:
    """Each module's adapter in PEFT's format under `out_dir/<part>/`, as `PeftModel.save_pretrained`
    writes it (so `PeftModel.from_pretrained(module, folder)` loads it); keys sorted: same bytes."""
    for part, module in modules.items():
        folder = out_dir / part
        folder.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(module)
        tensors = {PEFT_PREFIX + k: state[k].contiguous() for k in sorted(state)}
        save_file(tensors, str(folder / PEFT_WEIGHTS))
        module.peft_config["default"].save_pretrained(str(folder))


def load_adapters(pipe: Any, directory: str | Path) -> Any:
    """Put a train stage's adapter export back onto `pipe`: diffusers' loader for LoRA and DoRA,
    PEFT's for the folders of LoKr and LoHa."""
    directory = Path(directory)
    parts = [p for p in PIPELINE_PARTS if (directory / p / PEFT_CONFIG).is_file()]
    if not parts:
        pipe.load_lora_weights(str(directory))
        return pipe
    for part in parts:
        module = getattr(pipe, part, None)
        if module is None:
            raise UserError(f"{directory / part} holds an adapter for {part}, which {pipe} lacks.")
        config = PeftConfig.from_pretrained(str(directory / part))
        inject_adapter_in_model(config, module, adapter_name="default")
        saved = load_file(str(directory / part / PEFT_WEIGHTS))
        state = {k.removeprefix(PEFT_PREFIX): v for k, v in saved.items()}
        result = set_peft_model_state_dict(module, state)
        if result.unexpected_keys:
            raise UserError(
                f"{directory / part}: {len(result.unexpected_keys)} adapter weights match no module "
                f"of the base's {part} (e.g. {result.unexpected_keys[0]}): another base model?"
            )
    return pipe
