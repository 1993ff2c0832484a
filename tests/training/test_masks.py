"""Masked loss (`sdflow.training.masks`) in both objectives: with a mask covering half the image,
the loss's gradient is zero on the uncovered half and not on the covered one, and the loss is the
per-sample normalised masked mean, recomputed here by hand."""

from __future__ import annotations

import pytest
import torch
from fixtures.training import batch_of, sd_scheduler

from sdflow.config import TrainConfig
from sdflow.models.components import build_unet
from sdflow.profiles import load_profile
from sdflow.training import flow_objective
from sdflow.training.objective import diffusion_loss, draw_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROWS = 6


def left_half(rows: int, size: int = 8) -> torch.Tensor:
    """[rows, 1, size, size]: 1 on the left half (columns < size / 2), 0 on the right."""
    mask = torch.zeros(rows, 1, size, size)
    mask[..., : size // 2] = 1.0
    return mask


def expected_masks(ramp_source, batch, train: TrainConfig, seed: int) -> torch.Tensor:
    """Each row's mask as the step must use it: mirrored where the row reads flipped latents."""
    inputs = draw_inputs(
        sd_scheduler(), ramp_source, batch, torch.Generator().manual_seed(seed), train
    )
    assert 0 < int(inputs.flip.sum()) < ROWS  # both kinds of rows are exercised
    masks = batch["mask"].clone()
    masks[inputs.flip] = masks[inputs.flip].flip(-1)
    return masks


def test_ddpm_gradient_is_zero_where_the_mask_is_and_the_loss_is_its_mean(ramp_source):
    unet = build_unet(load_profile("tiny-test").model).train()
    outputs: list[torch.Tensor] = []

    def keep(module, args, output):
        output.sample.retain_grad()
        outputs.append(output.sample)

    unet.register_forward_hook(keep)
    batch = batch_of(ramp_source, list(range(ROWS))) | {"mask": left_half(ROWS)}
    train = TrainConfig(masked_loss=True)
    loss = diffusion_loss(
        unet, sd_scheduler(), ramp_source, batch, torch.Generator().manual_seed(1), train, "cpu"
    )
    loss.backward()
    masks = expected_masks(ramp_source, batch, train, seed=1)
    grad = outputs[0].grad
    covered = masks.expand_as(grad).bool()
    assert torch.all(grad[~covered] == 0)  # exactly zero on the uncovered half
    assert (grad[covered] != 0).float().mean() > 0.9  # and not there (a few may cancel)

    # the loss: per sample sum(m * e) / sum(m), then the batch mean (the target is the noise)
    inputs = draw_inputs(
        sd_scheduler(), ramp_source, batch, torch.Generator().manual_seed(1), train
    )
    error = (outputs[0].detach().double() - inputs.noise.double()) ** 2
    weights = masks.double().expand_as(error)
    per_sample = (error * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3))
    torch.testing.assert_close(loss.double(), per_sample.mean(), rtol=1e-5, atol=1e-7)


class PointwiseFamily:
    """A flow family whose model is a 1x1 convolution: each output element depends only on the
    input element at its place, so the gradient on the model's input is zero where the mask is."""

    def __init__(self):
        self.inputs: list[torch.Tensor] = []

    def predict(self, model, noisy, timesteps, text, added, train):
        noisy = noisy.detach().requires_grad_(True)
        self.inputs.append(noisy)
        return model(noisy)


def test_flow_gradient_on_the_model_input_is_zero_on_the_uncovered_half():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler()
    generator = torch.Generator().manual_seed(0)
    latents, noise = (
        torch.randn(3, 4, 8, 8, generator=generator),
        torch.randn(3, 4, 8, 8, generator=generator),
    )
    model = torch.nn.Conv2d(4, 4, 1)
    family = PointwiseFamily()
    train = TrainConfig(masked_loss=True)
    indices = torch.tensor([100, 500, 900])
    mask = left_half(3)
    loss = flow_objective.loss_at(
        model, scheduler, latents, noise, indices, None, {}, train, family, mask
    )
    loss.backward()
    grad = family.inputs[0].grad
    assert torch.all(grad[..., 4:] == 0) and torch.all(grad[..., :4] != 0)
    # without the mask every element counts (the same draw: the gradient is nonzero everywhere)
    family.inputs.clear()
    flow_objective.loss_at(
        model, scheduler, latents, noise, indices, None, {}, train, family
    ).backward()
    assert torch.all(family.inputs[0].grad != 0)


def test_an_empty_mask_contributes_zero_not_nan():
    from sdflow.training.masks import per_sample_mse

    pred, target = torch.ones(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    mask = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    assert per_sample_mse(pred, target, mask).tolist() == [0.0, 1.0]
