"""The rectified-flow objective against formulas recomputed here (diffusers' SD3/Flux training
scripts: `compute_density_for_timestep_sampling`, `compute_loss_weighting_for_sd3`, the scheduler's
shifted sigmas) and the pipelines' own packing and ids (FluxPipeline's static methods)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel

from sdflow.config import FlowConfig
from sdflow.models.components import component_sources
from sdflow.models.families import flux, sd3
from sdflow.profiles import load_profile
from sdflow.training.flow_objective import draw_indices, loss_at, noise_scheduler


def config_of(pipeline, *options):
    return load_profile(
        "tiny-test", ["model.init=pretrained", f"model.pretrained={pipeline}", *options]
    )


@pytest.mark.parametrize(
    "flow",
    [
        FlowConfig(timesteps="uniform"),
        FlowConfig(timesteps="logit_normal", logit_mean=0.3, logit_std=0.7),
        FlowConfig(timesteps="mode", mode_scale=1.29),
    ],
)
def test_timestep_densities_are_diffusers_formulas(flow):
    ours = draw_indices(flow, 1000, 4096, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    if flow.timesteps == "logit_normal":
        u = torch.normal(flow.logit_mean, flow.logit_std, (4096,), generator=generator).sigmoid()
    else:
        u = torch.rand(4096, generator=generator)
    if flow.timesteps == "mode":
        u = 1 - u - flow.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    assert torch.equal(ours, (u * 1000).long())  # no u of 1 here: the clamp does not act
    if flow.timesteps == "logit_normal":  # the density's mid-range mass, not uniform's
        assert abs(ours.float().mean().item() - 1000 / (1 + math.exp(-0.3))) < 20


def test_sigmas_are_the_shifted_schedule_and_shift_overrides(tiny_sd3):
    config = config_of(tiny_sd3)
    sources = component_sources(config, {}, ".")
    t = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    base = noise_scheduler(config, sources)
    torch.testing.assert_close(base.sigmas.double(), 3 * t / (1 + 2 * t), rtol=1e-6, atol=1e-6)
    shifted = noise_scheduler(config_of(tiny_sd3, "train.flow.shift=1.5"), sources)
    torch.testing.assert_close(
        shifted.sigmas.double(), 1.5 * t / (1 + 0.5 * t), rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(shifted.timesteps.double(), 1000 * shifted.sigmas.double())


def reference_loss(pred, latents, noise, sigmas, weighting):
    if weighting == "sigma_sqrt":
        weights = sigmas**-2.0
    elif weighting == "cosmap":
        weights = 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    else:
        weights = torch.ones_like(sigmas)
    per_sample = ((pred - (noise - latents)) ** 2).reshape(len(pred), -1).mean(1)
    return (weights * per_sample).mean()


def flow_inputs(width: int, pooled: int):
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    text, pooled = torch.randn(2, 12, width, generator=g), torch.randn(2, pooled, generator=g)
    return latents, noise, torch.tensor([100, 900]), text, pooled


@torch.no_grad()
def test_flux_loss_is_the_reference_with_packing_ids_and_guidance(tiny_flux):
    config = config_of(tiny_flux, "train.flow.weighting=cosmap", "train.guidance_scale=3.5")
    scheduler = noise_scheduler(config, component_sources(config, {}, "."))
    model = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    latents, noise, indices, text, pooled = flow_inputs(32, 16)
    added = {"pooled_projections": pooled}
    ours = loss_at(
        model, scheduler, latents, noise, indices, text, added, config.train, flux.FAMILY
    )
    sigmas, timesteps = scheduler.sigmas[indices], scheduler.timesteps[indices]
    s = sigmas[:, None, None, None]
    noisy = (1 - s) * latents + s * noise
    pred = model(
        hidden_states=FluxPipeline._pack_latents(noisy, 2, 16, 8, 8),
        timestep=timesteps / 1000,
        guidance=torch.full((2,), 3.5),
        pooled_projections=pooled,
        encoder_hidden_states=text,
        txt_ids=torch.zeros(12, 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
    ).sample
    pred = FluxPipeline._unpack_latents(pred, 32, 32, vae_scale_factor=4)
    torch.testing.assert_close(ours, reference_loss(pred, latents, noise, sigmas, "cosmap"))
    unguided = config_of(tiny_flux, "train.flow.weighting=cosmap", "train.guidance_scale=1.0")
    other = loss_at(
        model, scheduler, latents, noise, indices, text, added, unguided.train, flux.FAMILY
    )
    assert not torch.equal(other, ours)  # the guidance value reaches the model


@torch.no_grad()
def test_sd3_loss_is_the_reference_with_sigma_sqrt_weights(tiny_sd3):
    config = config_of(tiny_sd3, "train.flow.weighting=sigma_sqrt")
    scheduler = noise_scheduler(config, component_sources(config, {}, "."))
    model = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    latents, noise, indices, text, pooled = flow_inputs(48, 32)
    added = {"pooled_projections": pooled}
    ours = loss_at(model, scheduler, latents, noise, indices, text, added, config.train, sd3.FAMILY)
    sigmas = scheduler.sigmas[indices]
    s = sigmas[:, None, None, None]
    pred = model(
        hidden_states=(1 - s) * latents + s * noise,
        timestep=scheduler.timesteps[indices],
        encoder_hidden_states=text,
        pooled_projections=pooled,
    ).sample
    torch.testing.assert_close(ours, reference_loss(pred, latents, noise, sigmas, "sigma_sqrt"))
