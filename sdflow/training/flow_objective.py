"""The rectified-flow objective of the `sd3` and `flux` families (Esser et al. 2024, arXiv 2403.03206;
Lipman et al. 2023, arXiv 2210.02747), the sibling of `sdflow.training.objective` (DDPM).

A step draws the same things as a DDPM step (`objective.draw_inputs`, same order), except that the
timesteps are indices into the training scheduler's sigmas, drawn by `train.flow.timesteps`: u in
[0, 1) uniform, logit-normal (sigmoid of N(logit_mean, logit_std)) or `mode` (mode_scale), index =
floor(u x num_train_timesteps), as diffusers' SD3/Flux training scripts do. The noisy input is
(1 - sigma) x latents + sigma x noise, the target noise - latents, and the loss the mean squared
error weighted per sample by `train.flow.weighting` (none; sigma_sqrt: sigma^-2; cosmap:
2 / (pi (1 - 2 sigma + 2 sigma^2))). The sigmas are those of `FlowMatchEulerDiscreteScheduler`
built from the base's scheduler config, with `train.flow.shift` replacing its shift when set. The
model call (Flux: packed latents, ids, guidance) is the family's `predict`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor

from sdflow.config import FlowConfig, RunConfig, TrainConfig
from sdflow.models.components import ComponentSources, load_component
from sdflow.training.masks import per_sample_mse
from sdflow.training.objective import draw_inputs
from sdflow.training.speed import memory_format
from sdflow.training.text_training import encode_trained


def noise_scheduler(
    config: RunConfig, sources: ComponentSources
) -> FlowMatchEulerDiscreteScheduler:
    """The base's FlowMatchEuler schedule; `train.flow.shift` replaces its (dynamic) shift."""
    base = load_component(
        sources.scheduler, "scheduler", FlowMatchEulerDiscreteScheduler, config.model
    )
    shift = config.train.flow.shift
    if shift is None:
        return base
    return FlowMatchEulerDiscreteScheduler.from_config(
        base.config, shift=shift, use_dynamic_shifting=False
    )


def inference_scheduler(config: RunConfig, sources: ComponentSources, trained) -> Any:
    """The export's sampler: the base's own FlowMatchEuler scheduler and config, unshifted by
    `train.flow.shift` (the pipeline sets its sigmas per resolution itself)."""
    return load_component(
        sources.scheduler, "scheduler", FlowMatchEulerDiscreteScheduler, config.model
    )


def draw_indices(flow: FlowConfig, steps: int, size: int, generator: torch.Generator) -> Tensor:
    """[size] indices into the scheduler's sigmas, u drawn by `flow.timesteps`."""
    if flow.timesteps == "logit_normal":
        normal = torch.randn(size, generator=generator) * flow.logit_std + flow.logit_mean
        u = torch.sigmoid(normal)
    else:
        u = torch.rand(size, generator=generator)
        if flow.timesteps == "mode":
            u = 1 - u - flow.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    # a float u of exactly 1 (sigmoid's rounding, mode at u = 0) is the last index, not past it
    return (u * steps).long().clamp(0, steps - 1)


def loss_weights(weighting: str, sigmas: Tensor) -> Tensor:
    """Per-sample loss weights of diffusers' `compute_loss_weighting_for_sd3` schemes."""
    if weighting == "sigma_sqrt":
        return sigmas**-2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


def loss_at(
    model, scheduler, latents, noise, indices, text, added, train: TrainConfig, family, mask=None
):
    """The weighted flow-matching loss of given inputs (the step's, or validation's fixed ones);
    `mask` [B, 1, h, w]: per-element loss weights (`sdflow.training.masks`)."""
    sigmas = scheduler.sigmas[indices.cpu()].to(latents.device, torch.float32)
    timesteps = scheduler.timesteps[indices.cpu()].to(latents.device)
    expanded = sigmas.view(-1, *[1] * (latents.dim() - 1))
    noisy = (1 - expanded) * latents + expanded * noise
    noisy = noisy.to(memory_format=memory_format(train))
    pred = family.predict(model, noisy, timesteps, text, added, train)
    per_sample = per_sample_mse(pred.float(), (noise - latents).float(), mask)
    return (loss_weights(train.flow.weighting, sigmas) * per_sample).mean()


def flow_loss(
    model, scheduler, source, batch, generator, train: TrainConfig, device, text_encoder=None,
    family=None,
) -> Tensor:  # fmt: skip
    """One step's loss; every random draw comes from `generator`, in `draw_inputs`' order."""
    steps = scheduler.config.num_train_timesteps
    draw = partial(draw_indices, train.flow, steps)
    inputs = draw_inputs(scheduler, source, batch, generator, train, draw_timesteps=draw)
    added = {k: v.to(device) for k, v in (inputs.added or {}).items() if v is not None}
    text, added = encode_trained(text_encoder, inputs.text.to(device), added)
    return loss_at(
        model, scheduler, inputs.latents.to(device), inputs.noise.to(device),
        inputs.timesteps, text, added, train, family, inputs.mask,
    )  # fmt: skip
