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
as one module (`sdflow.families.sdxl.DualTextEncoder`), the second adapter seeded apart.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, inject_adapter_in_model
from transformers import CLIPTextModel

from sdflow.config import RunConfig, TrainConfig
from sdflow.families import family_of
from sdflow.models import ComponentSources

TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
CHECKPOINT_GROUP = "text_encoder"


def build_trainable_text_encoder(
    config: RunConfig, sources: ComponentSources, weight_dtype: torch.dtype = torch.float32
) -> CLIPTextModel | None:
    """The base text encoder(s) with exactly the trained parameters requiring grad, as the family's
    one trainable module (SDXL: both encoders); None if frozen."""
    train = config.train
    if train.text_encoder == "frozen":
        return None
    family = family_of(config)
    encoders = family.load_text(sources, config).encoders
    for index, encoder in enumerate(encoders):
        if train.text_encoder == "lora":
            encoder.requires_grad_(False)
            encoder.to(dtype=weight_dtype)  # frozen weights in the compute dtype; LoRA's stay fp32
            add_text_lora(encoder, train, index)
            cast_training_params(encoder, dtype=torch.float32)
        else:
            encoder.requires_grad_(True)
    return family.trainable_text(encoders).train()


def add_text_lora(encoder: CLIPTextModel, train: TrainConfig, index: int = 0) -> None:
    lora = LoraConfig(
        r=train.lora_rank,
        lora_alpha=train.lora_alpha or train.lora_rank,
        init_lora_weights="gaussian",
        target_modules=TEXT_LORA_TARGETS,
    )
    with torch.random.fork_rng(devices=[]):
        # not the UNet adapter's draws (nor the other encoder's); no global RNG either
        torch.manual_seed(train.seed + 1 + index)
        # peft's own injection (transformers' `add_adapter` wants a newer peft); it records the
        # config in `encoder.peft_config["default"]`, which the export writes into the metadata
        inject_adapter_in_model(lora, encoder, adapter_name="default")


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
