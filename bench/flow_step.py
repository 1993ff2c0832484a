"""The timed training step of a flow profile (SD 3.5, Flux) for `bench/gpu_step.py`.

The profile's transformer is built FROM CONFIG with random weights (no download) in the compute
dtype, the profile's LoRA added (or every weight trained for a full fine-tune), gradient
checkpointing as the profile sets it, and sdflow's own rectified-flow step
(`sdflow.training.flow_objective.flow_loss`, the family's `predict`: Flux's packing, ids and
guidance) runs on random latent-shaped inputs: 16-channel latents at resolution / 8, text states of
the profile's `model.max_sequence_length` T5 tokens (plus SD3's 77 CLIP tokens) and pooled
projections. Not applied: `model.quantize` (a from-config model has no quantized checkpoint to
load; the step then holds the frozen base in the compute dtype) and `train.master_weights`.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sdflow.models.adapters import adapter_config
from sdflow.models.families import get_family
from sdflow.training.flow_objective import flow_loss
from sdflow.training.optimizers import make_optimizer

CLIP_TOKENS = 77  # SD3 joins the CLIP states (77 tokens) before T5's


class RandomFlowLatents:
    """Latent-shaped inputs with the interface of sdflow's cached-latent batch source."""

    scaling_factor, shift_factor = 1.5305, 0.0609  # SD3's VAE (Flux's differ; values are random)

    def __init__(self, size: int, tokens: int, text_dim: int, pooled_dim: int):
        self.shape = (16, size, size)
        self.tokens, self.text_dim, self.pooled_dim = tokens, text_dim, pooled_dim
        self.empty_prompt = torch.zeros(tokens, text_dim)

    def batch(self, size: int) -> dict:
        return {
            "id": [str(i) for i in range(size)],
            "mean": torch.randn(size, *self.shape),
            "std": torch.full((size, *self.shape), 0.05),
            "text": torch.randn(size, self.tokens, self.text_dim),
            "pooled": torch.randn(size, self.pooled_dim),
        }

    def latent_dist(self, batch: dict, flip: torch.Tensor):
        return batch["mean"], batch["std"]

    def text(self, batch: dict) -> torch.Tensor:
        return batch["text"]

    def added_conditioning(self, batch: dict, drop: torch.Tensor) -> dict:
        return {"pooled_projections": batch["pooled"]}


def build_transformer(class_name: str, architecture: dict, config, device, dtype):
    """The transformer from config, trained as the profile says (LoRA or full)."""
    import diffusers

    model = getattr(diffusers, class_name)(**architecture).to(device, dtype)
    if config.train.mode == "lora":
        model.requires_grad_(False)
        model.add_adapter(adapter_config(config.train, list(config.train.lora_targets)))
        for param in model.parameters():
            if param.requires_grad:  # the adapter trains in float32 under mixed precision
                param.data = param.data.float()
    if config.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def flow_training_step(config, class_name: str, architecture: dict, args, accelerator, dtype):
    """(one training step of the profile's transformer, returning its loss; the trained
    parameters): `bench/gpu_step.py` times it as it times the UNet profiles' step."""
    train, device = config.train, accelerator.device
    model = build_transformer(class_name, architecture, config, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    model, optimizer = accelerator.prepare(model, make_optimizer(train, params, False))
    flux = class_name.startswith("Flux")
    family = get_family("flux" if flux else "sd3")
    t5_tokens = config.model.max_sequence_length or (512 if flux else 256)  # pipeline defaults
    tokens = t5_tokens + (0 if flux else CLIP_TOKENS)
    size = (args.resolution or config.download.resolution) // 8
    source = RandomFlowLatents(
        size, tokens, architecture["joint_attention_dim"], architecture["pooled_projection_dim"]
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    generator = torch.Generator().manual_seed(0)
    batch_size = args.batch_size or train.batch_size

    def step() -> float:
        with accelerator.autocast():
            loss = flow_loss(model, scheduler, source, source.batch(batch_size), generator,
                             train, device, family=family)  # fmt: skip
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, params
