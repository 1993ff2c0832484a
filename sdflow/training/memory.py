"""Memory options for small GPUs besides the optimizer's (`sdflow.training.optimizers`: adamw8bit,
adafactor): EMA weights on the CPU.

- `ema_on_cpu` keeps the EMA copy (one fp32 copy of the trained weights) in CPU memory; each step
  copies the trained weights to the CPU and averages there, with the same arithmetic as on the
  device, so the EMA is the same.
"""

from __future__ import annotations

import torch
from diffusers.training_utils import EMAModel

from sdflow.config import TrainConfig


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
