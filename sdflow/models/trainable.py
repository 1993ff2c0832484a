"""The model as trained: the UNet and text encoder(s) with exactly the trained parameters requiring
grad (all of them, or a LoRA adapter's), and the same modules loaded back from a train checkpoint.

The training loop builds its modules here; evaluation and export load the trained ones here, so neither
reaches into the loop. LoRA's random init is seeded by `train.seed` (the text encoders' adapters by
`seed + 1 + index`), never by the global RNG.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel, cast_training_params
from peft import inject_adapter_in_model
from torch import Tensor
from transformers import CLIPTextModel

from sdflow.config import RunConfig, TrainConfig
from sdflow.errors import UserError
from sdflow.models.adapters import adapter_config
from sdflow.models.components import ComponentSources, build_unet, load_component
from sdflow.models.families import family_of
from sdflow.models.quantize import denoiser_quantization
from sdflow.store.checkpoints import load_checkpoint

TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


CHECKPOINT_GROUP = "text_encoder"


def build_trainable_denoiser(
    config: RunConfig,
    sources: ComponentSources,
    weight_dtype: torch.dtype = torch.float32,
    quantize: bool = False,
) -> torch.nn.Module:
    """The family's denoiser (UNet, or SD3's / Flux's transformer) with exactly the trained
    parameters requiring grad (all, or only LoRA's). `quantize`: the frozen base as
    `model.quantize` says (training); else unquantized (export, evaluation)."""
    train = config.train
    quantization = denoiser_quantization(config, weight_dtype) if quantize else None
    if sources.unet is None:
        model = build_unet(config.model)
    else:
        family = family_of(config)
        model = load_component(
            sources.unet, family.denoiser_part, family.denoiser_class, config.model,
            weight_dtype if quantization else None, quantization,
        )  # fmt: skip
    if train.mode == "lora":
        model.requires_grad_(False)
        if quantization is None:  # frozen weights in the compute dtype; LoRA weights stay fp32
            model.to(dtype=weight_dtype)
        if train.init_lora:  # an existing adapter file: its rank, alpha and weights
            from sdflow.models.formats.kohya import load_unet_adapter

            pipeline_class = family_of(config).pipeline_class
            text = train.text_encoder == "lora"
            load_unet_adapter(Path(train.init_lora), pipeline_class, model, text)
        else:
            add_lora(model, train)
        cast_training_params(model, dtype=torch.float32)
    elif train.master_weights == "bfloat16":  # no float32 copy (sdflow.training.master_weights)
        model.to(dtype=torch.bfloat16)
    if train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def add_lora(unet: UNet2DConditionModel, train: TrainConfig) -> None:
    lora = adapter_config(train, list(train.lora_targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train.seed)  # LoRA's random init must not depend on the global RNG
        try:
            unet.add_adapter(lora)
        except ValueError as exc:
            raise UserError(
                f"train.lora_targets {train.lora_targets} matched no layer of the denoiser "
                f"({exc}). Use attention projection names such as to_q, to_k, to_v, to_out.0."
            ) from None


def build_trainable_text_encoder(
    config: RunConfig, sources: ComponentSources, weight_dtype: torch.dtype = torch.float32
) -> CLIPTextModel | None:
    """The base text encoder(s) with exactly the trained parameters requiring grad, as the family's
    one trainable module (SDXL: both encoders); None if frozen."""
    train = config.train
    if train.text_encoder == "frozen":
        return None
    family = family_of(config)
    dtype = weight_dtype if train.text_encoder == "lora" else None  # SD3/Flux: T5's, frozen
    encoders = family.load_text(sources, config, dtype).encoders
    trained = getattr(family, "trained_text_count", len(encoders))  # sd3, flux: the CLIPs
    for index, encoder in enumerate(encoders[:trained]):
        if train.text_encoder == "lora":
            encoder.requires_grad_(False)
            encoder.to(dtype=weight_dtype)  # frozen weights in the compute dtype; LoRA's stay fp32
            if not _init_text_lora(config, encoder, index):
                add_text_lora(encoder, train, index)
            cast_training_params(encoder, dtype=torch.float32)
        else:
            encoder.requires_grad_(True)
    return family.trainable_text(encoders).train()


def _init_text_lora(config: RunConfig, encoder, index: int) -> bool:
    """The adapter of text encoder `index` from `train.init_lora`, when the file has one."""
    if not config.train.init_lora:
        return False
    from sdflow.models.formats.kohya import load_text_adapter

    family = family_of(config)
    return load_text_adapter(Path(config.train.init_lora), family.pipeline_class, encoder, index)


def add_text_lora(encoder: CLIPTextModel, train: TrainConfig, index: int = 0) -> None:
    lora = adapter_config(train, TEXT_LORA_TARGETS)
    with torch.random.fork_rng(devices=[]):
        # not the UNet adapter's draws (nor the other encoder's); no global RNG either
        torch.manual_seed(train.seed + 1 + index)
        # peft's own injection (transformers' `add_adapter` wants a newer peft); it records the
        # config in `encoder.peft_config["default"]`, which the export writes into the metadata
        inject_adapter_in_model(lora, encoder, adapter_name="default")


def load_trained_weights(
    unet: torch.nn.Module, weights: dict[str, Tensor], what: str = "UNet"
) -> None:
    trained = {n for n, p in unet.named_parameters() if p.requires_grad}
    result = unet.load_state_dict(weights, strict=False)
    missing = trained & set(result.missing_keys)
    if missing or result.unexpected_keys:
        raise UserError(
            f"The checkpoint does not fit this {what}: {len(missing)} trained weights missing, "
            f"{len(result.unexpected_keys)} unexpected (e.g. {sorted(missing)[:1]}"
            f"{result.unexpected_keys[:1]}). Was the checkpoint made with another config?"
        )


def trained_unet(config: RunConfig, sources: ComponentSources, checkpoint: Path):
    """The final UNet (fp32, CPU) from a checkpoint directory, with EMA weights when `train.ema`."""
    unet = build_trainable_denoiser(config, sources)
    _, values = load_checkpoint(checkpoint)
    load_trained_weights(unet, values["model"])
    if config.train.ema:
        params = [p for p in unet.parameters() if p.requires_grad]
        ema = EMAModel(params, decay=config.train.ema_decay)
        ema.load_state_dict(values["ema"])
        ema.copy_to(params)
    return unet.eval()


def trained_text_encoder(config: RunConfig, sources: ComponentSources, checkpoint: Path):
    """The trained text encoder (fp32, CPU, LoRA adapter attached) from a checkpoint directory;
    None when it is frozen. No EMA: EMA averages the UNet only."""
    encoder = build_trainable_text_encoder(config, sources)
    if encoder is not None:
        _, values = load_checkpoint(checkpoint)
        load_trained_weights(encoder, values[CHECKPOINT_GROUP], "text encoder")
        encoder.eval()
    return encoder
