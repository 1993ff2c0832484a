"""The diffusion objective of one training step: what it draws at random, and the loss.

`draw_inputs` makes every random draw of a step from one generator, in a fixed order (exact resume
depends on it): horizontal flips, caption dropout, a fresh sample of each image's latent
distribution, the noise (with `train.noise_offset`) and the timesteps. `diffusion_loss` noises the
latents, runs the UNet (and a trained text encoder), and compares its output with
`prediction_target` (epsilon or v) by `weighted_mse` (plain, or min-SNR-gamma weighted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from torch import Tensor

from sdflow.config import TrainConfig
from sdflow.training.masks import loss_mask, per_sample_mse
from sdflow.training.speed import memory_format
from sdflow.training.tag_shuffle import shuffle_captions


@dataclass
class StepInputs:
    """What one step draws at random: the augmentation choices, the noised sample's parts."""

    flip: Tensor  # [B] bool: the row reads its flipped latents
    drop: Tensor  # [B] bool: the row's caption is replaced by the empty prompt
    latents: Tensor  # [B, C, h, w] a fresh sample of the latent distribution, scaled
    noise: Tensor  # [B, C, h, w] the added noise (offset included)
    timesteps: Tensor  # [B]
    text: Tensor  # [B, L, D] caption embeddings, or [B, L] token ids when the text encoder
    # trains (the empty prompt's where dropped)
    added: dict[str, Tensor] | None = None  # the UNet's added_cond_kwargs (SDXL), None for SD
    mask: Tensor | None = None  # [B, 1, h, w] loss weights (train.masked_loss), None: all count


def draw_inputs(
    scheduler, source, batch, generator, train: TrainConfig, draw_timesteps=None
) -> StepInputs:
    """Every random draw of a step, from `generator`, in this order (exact resume depends on it).

    `draw_timesteps(size, generator)` draws the timesteps (default: uniform DDPM timesteps); the
    flow-matching objective draws indices into its sigmas there."""
    size = len(batch["id"])
    flip = (torch.rand(size, generator=generator) < 0.5) & train.use_flipped
    drop = torch.rand(size, generator=generator) < train.caption_dropout
    mean, std = source.latent_dist(batch, flip)
    # A fresh sample from the VAE's latent distribution each step, as if the image were re-encoded.
    sample = torch.randn(mean.shape, generator=generator)
    latents = (mean.float() + std.float() * sample - source.shift_factor) * source.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    if train.noise_offset:
        # Offset noise lets the model change an image's mean brightness:
        # https://www.crosslabs.org/blog/diffusion-with-offset-noise
        offset = torch.randn((size, latents.shape[1], 1, 1), generator=generator)
        noise = noise + train.noise_offset * offset
    if draw_timesteps is None:
        steps = scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (size,), generator=generator)
    else:
        timesteps = draw_timesteps(size, generator)
    batch = shuffle_captions(source, batch, generator, train)  # draws only with caption_shuffle
    dropped = drop.view(-1, *[1] * source.empty_prompt.dim())
    text = torch.where(dropped, source.empty_prompt, source.text(batch).cpu())
    added = source.added_conditioning(batch, drop)  # nothing random: SD's draws are unchanged
    return StepInputs(flip, drop, latents, noise, timesteps, text, added, loss_mask(batch, flip))


def prediction_target(scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the UNet learns to predict: the noise, or v (Salimans & Ho 2022, arXiv 2202.00512)."""
    if scheduler.config.prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(latents, noise, timesteps)


def diffusion_loss(
    unet, scheduler, source, batch, generator, train: TrainConfig, device, text_encoder=None,
    family=None,
) -> Tensor:  # fmt: skip
    """The diffusion training step written out; every random draw comes from `generator`, in order.

    `text_encoder` (when it trains) turns the drawn token ids into the UNet's conditioning."""
    inputs = draw_inputs(scheduler, source, batch, generator, train)
    latents, noise = inputs.latents.to(device), inputs.noise.to(device)
    timesteps = inputs.timesteps.to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps).to(memory_format=memory_format(train))
    target = prediction_target(scheduler, latents, noise, timesteps)
    text = inputs.text.to(device)
    added = inputs.added
    if text_encoder is not None:
        encoded = text_encoder(text)
        text = encoded[0]
        if added is not None:  # SDXL: the trained encoder's pooled projection, not a cached one
            added = {**added, "text_embeds": encoded[1]}
    pred = unet(noisy, timesteps, text, **added_kwargs(added, device)).sample
    return weighted_mse(
        pred.float(), target.float(), scheduler, timesteps, train.snr_gamma, inputs.mask
    )


def added_kwargs(added: dict[str, Tensor] | None, device) -> dict[str, Any]:
    """`added_cond_kwargs` for the UNet call on `device` (none for a UNet that takes none)."""
    if added is None:
        return {}
    return {"added_cond_kwargs": {key: value.to(device) for key, value in added.items()}}


def weighted_mse(pred, target, scheduler, timesteps, snr_gamma: float | None, mask=None) -> Tensor:
    """MSE, optionally with min-SNR-gamma weights (Hang et al. 2023, arXiv 2303.09556) and per
    element by a loss mask (`sdflow.training.masks`)."""
    if snr_gamma is None and mask is None:
        return F.mse_loss(pred, target)
    if snr_gamma is None:
        return per_sample_mse(pred, target, mask).mean()
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=snr_gamma)
    # The paper's weight min(snr, gamma) is for predicting x0; predicting eps divides by snr, and
    # predicting v (whose loss is (snr + 1) times the x0 loss) divides by snr + 1.
    if scheduler.config.prediction_type == "v_prediction":
        weights = clipped / (snr + 1)
    else:
        weights = clipped / snr
    return (per_sample_mse(pred, target, mask) * weights).mean()


def loss_at(
    unet, scheduler, latents, noise, timesteps, text, added, train: TrainConfig, family=None
):
    """The loss of given inputs (validation's fixed held-out ones), as a step computes it."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = prediction_target(scheduler, latents, noise, timesteps)
    pred = unet(noisy, timesteps, text, **added_kwargs(added, latents.device)).sample
    return weighted_mse(pred.float(), target.float(), scheduler, timesteps, train.snr_gamma)
