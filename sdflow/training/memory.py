"""Memory options for small GPUs: 8-bit AdamW (`train.optimizer`) and EMA weights on the CPU.

- `adamw8bit` is bitsandbytes' `AdamW8bit`: the two Adam moments in 8 bits (block-wise quantised)
  instead of 32, so about 6 bytes less per trained weight. bitsandbytes needs CUDA; it is the
  optional extra `gpu` (`pip install -e '.[gpu]'`). Asked for without CUDA, or without the
  package, training stops before any work with a `UserError` naming the key.
- `ema_on_cpu` keeps the EMA copy (one fp32 copy of the trained weights) in CPU memory; each step
  copies the trained weights to the CPU and averages there, with the same arithmetic as on the
  device, so the EMA is the same.
"""

from __future__ import annotations

import importlib.util

import torch
from diffusers.training_utils import EMAModel

from sdflow.config import TrainConfig
from sdflow.errors import UserError


def check_memory_options(train: TrainConfig) -> None:
    """Refuse, before any work, a memory option this host cannot run."""
    if train.optimizer != "adamw8bit":
        return
    if not torch.cuda.is_available():
        raise UserError(
            "train.optimizer is 'adamw8bit' (bitsandbytes' 8-bit AdamW), which needs a CUDA GPU, "
            "and this host has none: use train.optimizer 'adamw' here."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            "train.optimizer is 'adamw8bit' but bitsandbytes is not installed: "
            "pip install -e '.[gpu]', or use train.optimizer 'adamw'."
        )


def make_optimizer(
    train: TrainConfig, params: list[torch.nn.Parameter], fused: bool = False
) -> torch.optim.Optimizer:
    """AdamW (fused: torch's fused kernel, see `sdflow.training.speed.fused_adamw`) or 8-bit AdamW."""
    if train.optimizer == "adamw8bit":
        check_memory_options(train)
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=train.lr, weight_decay=train.adam_weight_decay)
    # else foreach (batched over weights, torch's own choice on CUDA), never the per-weight Python
    # loop torch picks on a CPU
    kernel = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.adam_weight_decay, **kernel)


class CpuEMA(EMAModel):
    """An EMAModel whose averages stay in CPU memory while the model trains on a GPU."""

    def step(self, parameters) -> None:
        super().step([_on_cpu(p) for p in parameters])

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> None:
        super().to("cpu", dtype, non_blocking)  # never onto the GPU


def _on_cpu(param: torch.Tensor) -> torch.Tensor:
    """The parameter's values on the CPU (the tensor itself there), with its requires_grad flag:
    EMAModel averages the trained weights and copies the frozen ones."""
    if param.device.type == "cpu":
        return param
    return param.detach().to("cpu").requires_grad_(param.requires_grad)


def make_ema(train: TrainConfig, params: list[torch.nn.Parameter]) -> EMAModel | None:
    if not train.ema:
        return None
    cls = CpuEMA if train.ema_on_cpu else EMAModel
    return cls(params, decay=train.ema_decay, foreach=True)  # batched over weights, no Python loop
