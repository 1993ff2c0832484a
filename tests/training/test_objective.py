"""The training step's objective (`sdflow.training.objective`) checked against references computed
by hand on fixed tensors.

Each test fails if its option is switched on but does nothing, or does something else: min-SNR-γ
weights, the v-prediction target, offset noise, caption dropout, flip sampling, latent resampling.
"""

from __future__ import annotations

import math

import pytest
import torch
from fixtures.training import EMPTY_VALUE, ROWS, SCALE, all_rows, batch_of, sd_scheduler

from sdflow.config import TrainConfig
from sdflow.training.objective import diffusion_loss, draw_inputs, prediction_target, weighted_mse

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def within_binomial(hits: int, n: int, p: float) -> bool:
    """Within 4 standard deviations of the expected count."""
    return abs(hits - n * p) <= 4 * math.sqrt(n * p * (1 - p))


# ------------------------------------------------------------------------------- loss weighting


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_paper(prediction_type):
    scheduler = sd_scheduler(prediction_type)
    timesteps = torch.tensor([0, 10, 100, 400, 999])
    per_sample = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])  # the MSE of each row
    target = per_sample.sqrt()[:, None, None, None] * torch.ones(5, 4, 2, 2)
    pred = torch.zeros_like(target)
    gamma = 5.0
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    assert snr[0] > gamma > snr[-1]  # both sides of the clip are exercised
    if prediction_type == "epsilon":
        weights = torch.minimum(snr, torch.tensor(gamma)) / snr
    else:
        weights = torch.minimum(snr, torch.tensor(gamma)) / (snr + 1)
    expected = float((per_sample.double() * weights).mean())
    loss = weighted_mse(pred, target, scheduler, timesteps, gamma)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(weighted_mse(pred, target, scheduler, timesteps, None)) == pytest.approx(3.0)


def test_v_prediction_target_is_the_closed_form():
    scheduler = sd_scheduler("v_prediction")
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=generator)
    eps = torch.randn(4, 4, 8, 8, generator=generator)
    t = torch.tensor([0, 250, 600, 999])
    a = scheduler.alphas_cumprod[t].double()[:, None, None, None]
    v = a.sqrt() * eps.double() - (1 - a).sqrt() * x0.double()
    got = prediction_target(scheduler, x0, eps, t)
    torch.testing.assert_close(got.double(), v, rtol=1e-5, atol=1e-5)
    assert torch.equal(prediction_target(sd_scheduler("epsilon"), x0, eps, t), eps)


def test_the_loss_regresses_the_unet_onto_v(ramp_source):
    """diffusion_loss with a UNet that predicts 0 is the mean square of the hand-made v."""
    scheduler = sd_scheduler("v_prediction")
    train = TrainConfig()
    batch = all_rows(ramp_source)
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()

    class Zero(torch.nn.Module):
        def forward(self, noisy, timesteps, text):
            self.seen = noisy
            return type("Out", (), {"sample": torch.zeros_like(noisy)})

    unet = Zero()
    loss = diffusion_loss(
        unet, scheduler, ramp_source, batch, generator, train, torch.device("cpu")
    )
    inputs = draw_inputs(scheduler, ramp_source, batch, torch.Generator().set_state(state), train)
    a = scheduler.alphas_cumprod[inputs.timesteps].double()[:, None, None, None]
    x0, eps = inputs.latents.double(), inputs.noise.double()
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    assert float(loss) == pytest.approx(float((v**2).mean()), rel=1e-5)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(unet.seen.double(), noisy, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- random draws


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_offset_noise_adds_a_per_channel_shift_of_the_right_variance(ramp_source, offset):
    train = TrainConfig(noise_offset=offset)
    inputs = draw_inputs(
        sd_scheduler(),
        ramp_source,
        all_rows(ramp_source, 100),
        torch.Generator().manual_seed(0),
        train,
    )
    channel_means = inputs.noise.mean(dim=(2, 3))  # [rows, channels]
    # mean of 64 unit normals (variance 1/64) plus one offset draw (variance offset^2)
    assert float(channel_means.var()) == pytest.approx(1 / 64 + offset**2, rel=0.12)
    within = inputs.noise - channel_means[:, :, None, None]
    assert float(within.var()) == pytest.approx(63 / 64, rel=0.03)


@pytest.mark.parametrize("rate", [0.0, 0.25, 1.0])
def test_caption_dropout_rate_and_the_empty_prompt(ramp_source, rate):
    train = TrainConfig(caption_dropout=rate)
    generator = torch.Generator().manual_seed(1)
    dropped = draws = 0
    for _ in range(40):
        inputs = draw_inputs(
            sd_scheduler(), ramp_source, all_rows(ramp_source, 4), generator, train
        )
        rows = torch.arange(ROWS).repeat(4)
        text = inputs.text
        assert torch.equal(text[inputs.drop], torch.full_like(text[inputs.drop], EMPTY_VALUE))
        own = (rows[~inputs.drop].float() / 100)[:, None, None] * torch.ones(16, 32)
        assert torch.equal(text[~inputs.drop], own)
        dropped += int(inputs.drop.sum())
        draws += len(rows)
    assert within_binomial(dropped, draws, rate)


@pytest.mark.parametrize("use_flipped", [True, False])
def test_flips_are_sampled_half_the_time_and_read_the_flipped_latents(ramp_source, use_flipped):
    train = TrainConfig(use_flipped=use_flipped)
    generator = torch.Generator().manual_seed(2)
    inputs = draw_inputs(sd_scheduler(), ramp_source, all_rows(ramp_source, 100), generator, train)
    rows = torch.arange(ROWS).repeat(100).float()
    # std is 0.1 and rows are integers apart: the sign of the latent tells which mean was read
    read_flipped = inputs.latents.mean(dim=(1, 2, 3)) / SCALE < rows - 0.5
    nonzero = rows > 0  # row 0's flipped mean is its mean
    assert torch.equal(read_flipped[nonzero], inputs.flip[nonzero])
    if use_flipped:
        assert within_binomial(int(inputs.flip.sum()), len(rows), 0.5)
    else:
        assert not inputs.flip.any()


def test_latents_are_resampled_from_mean_and_std(ramp_source):
    train = TrainConfig(use_flipped=False)
    batch = batch_of(ramp_source, [5] * 4000)  # one image seen 4000 times: mean 5, std 0.1
    inputs = draw_inputs(
        sd_scheduler(), ramp_source, batch, torch.Generator().manual_seed(4), train
    )
    unscaled = inputs.latents / SCALE
    assert float(unscaled.mean()) == pytest.approx(5.0, abs=4 * 0.1 / math.sqrt(unscaled.numel()))
    assert float(unscaled.std(dim=0).mean()) == pytest.approx(0.1, rel=0.03)
    # the epsilon is the generator's: drawn after the flip and dropout draws of the batch
    generator = torch.Generator().manual_seed(4)
    torch.rand(4000, generator=generator), torch.rand(4000, generator=generator)
    eps = torch.randn(4000, 4, 8, 8, generator=generator)
    torch.testing.assert_close(inputs.latents, (5.0 + 0.1 * eps) * SCALE)
