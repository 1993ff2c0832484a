"""Training the text encoder beside the UNet: `train.text_encoder: lora | full` (fine-tunes only).

A frozen text encoder (the default) never runs in the train step: the latents stage caches every
caption's embedding. A trained one cannot be cached, so the latents stage caches the captions' token
ids instead and the step runs the encoder on them (prepared by accelerate with the UNet, so under the
same mixed-precision autocast), with gradients. `lora` adds a rank-`train.lora_rank` adapter
(`train.lora_alpha`) on the CLIP attention projections `q_proj`, `k_proj`, `v_proj`, `out_proj`;
`full` trains every weight. The optimizer gets a second parameter group at `train.text_encoder_lr`
(default `train.lr`); checkpoints hold the encoder's trained weights in their `text_encoder` group.
EMA averages the UNet only; the exported text encoder is the last step's. Gradient checkpointing
(`train.gradient_checkpointing`) applies to the UNet only. SDXL trains both its encoders this way,
as one module (`sdflow.models.families.sdxl.DualTextEncoder`), the second adapter seeded apart.
SD3 and Flux train LoRA on their CLIP encoder(s) with T5 frozen, run every step
(`sdflow.models.families.flow.FlowTextEncoder`; `encode_trained` in the flow objective).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sdflow.config import TrainConfig


def trained_parameters(module: torch.nn.Module | None) -> list[torch.nn.Parameter]:
    return [] if module is None else [p for p in module.parameters() if p.requires_grad]


def param_groups(
    train: TrainConfig, unet_params: list[torch.nn.Parameter], text_params: list[torch.nn.Parameter]
) -> list[Any]:
    """The optimizer's parameters: the UNet's alone (frozen encoder, as always), or two groups."""
    if not text_params:
        return unet_params
    text_lr = train.text_encoder_lr or train.lr
    return [{"params": unet_params, "lr": train.lr}, {"params": text_params, "lr": text_lr}]


def encode_trained(text_encoder, ids: Tensor, added: dict[str, Tensor]) -> tuple[Tensor, dict]:
    """The flow families' conditioning from the step's token ids with the trained encoders
    (states, and `pooled_projections` replacing the cached pooled); unchanged when frozen."""
    if text_encoder is None:
        return ids, added
    states, pooled = text_encoder(ids)
    return states, {**added, "pooled_projections": pooled}
