"""The optimizers (`train.optimizer`), built with the settings their authors recommend.

- `adamw`: torch's AdamW (`foreach`, or `fused` with `train.fused_adamw`).
- `adamw8bit`: bitsandbytes' AdamW8bit, the two moments in 8 bits (block-wise quantised), about
  6 bytes less per trained weight; CUDA only, extra `gpu` (`pip install -e '.[gpu]'`).
- `prodigy`: Prodigy (Mishchenko & Defazio 2023, https://arxiv.org/abs/2306.06101; package
  `prodigyopt`) estimates the step size itself (its `d`); `train.lr` is a multiplier of that estimate,
  1.0 as recommended (0.1-1 allowed: a learning rate such as 1e-4 copied from AdamW would make it
  10,000x too slow, so it is refused), betas (0.9, 0.99), bias correction on, decoupled weight
  decay `train.adam_weight_decay`, `train.prodigy_d_coef` scaling the estimate, and with warmup
  `safeguard_warmup` (the estimate does not grow on the warmup's small steps).
- `adafactor`: transformers' Adafactor (factored second moments: memory per weight matrix grows
  with rows + columns, not rows x columns) with a fixed learning rate, `train.lr` under the lr
  schedule: relative step, parameter scaling and warmup-init off, no first moment.

Each optimizer's state goes into the checkpoint (`optimizer.state_dict()`: tensors into safetensors,
numbers into JSON), so a resumed run continues bitwise. Every lr schedule applies to all four: the
schedule multiplies `train.lr`, which Prodigy multiplies by its `d`.
"""

from __future__ import annotations

import importlib.util

import torch

from sdflow.config import TrainConfig
from sdflow.errors import UserError

PACKAGES = {"adamw8bit": ("bitsandbytes", "gpu"), "prodigy": ("prodigyopt", "")}


def check_optimizer(train: TrainConfig) -> None:
    """Refuse, before any work, an optimizer this host cannot run."""
    if train.optimizer == "adamw8bit" and not torch.cuda.is_available():
        raise UserError(
            "train.optimizer is 'adamw8bit' (bitsandbytes' 8-bit AdamW), which needs a CUDA GPU, "
            "and this host has none: use train.optimizer 'adamw' (or 'adafactor', which also "
            "saves memory) here."
        )
    if train.optimizer in PACKAGES:
        package, extra = PACKAGES[train.optimizer]
        if importlib.util.find_spec(package) is None:
            install = f"pip install -e '.[{extra}]'" if extra else f"pip install {package}"
            raise UserError(
                f"train.optimizer is {train.optimizer!r} but {package} is not installed: "
                f"{install}, or use train.optimizer 'adamw'."
            )


def make_optimizer(train: TrainConfig, params: list, fused: bool = False) -> torch.optim.Optimizer:
    """`train.optimizer` over `params` (a list of tensors, or of parameter groups)."""
    check_optimizer(train)
    if train.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=train.lr, weight_decay=train.adam_weight_decay)
    if train.optimizer == "prodigy":
        return _prodigy(train, params)
    if train.optimizer == "adafactor":
        return _adafactor(train, params)
    # else foreach (batched over weights, torch's own choice on CUDA), never the per-weight Python
    # loop torch picks on a CPU
    kernel = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.adam_weight_decay, **kernel)


def _prodigy(train: TrainConfig, params: list) -> torch.optim.Optimizer:
    from prodigyopt import Prodigy

    return Prodigy(
        params,
        lr=train.lr,
        betas=(0.9, 0.99),
        weight_decay=train.adam_weight_decay,
        decouple=True,
        use_bias_correction=True,
        safeguard_warmup=train.warmup_steps > 0,
        d_coef=train.prodigy_d_coef,
    )


def _adafactor(train: TrainConfig, params: list) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    return Adafactor(
        params,
        lr=train.lr,
        relative_step=False,
        scale_parameter=False,
        warmup_init=False,
        weight_decay=train.adam_weight_decay,
    )
