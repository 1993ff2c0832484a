"""The prior-preservation step: its loss recomputed here from what the step drew and predicted
(DreamBooth's two-part loss as diffusers' train_dreambooth.py writes it: instance MSE + weight x
prior MSE, each a mean over its own rows), for a DDPM family and a rectified-flow family, and exact
resume with class rows in the batches.

The instance and class rows both come from class_images stage outputs (the latents cache's format)
of the tiny pipelines, with different prompts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from fixtures.prior import StepRecorder, prior_config

from sdflow.store.checkpoints import load_latest
from sdflow.training.loop import train_unet
from tasks.class_images import make_class_images

WEIGHT = 0.7


def cached_rows(pipeline, workdir, prompt: str, count: int, *options: str) -> dict:
    return make_class_images(prior_config(pipeline, prompt, count, *options), {}, str(workdir))


@pytest.fixture(scope="module")
def sd_rows(tiny_sd, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("prior-sd")
    base = tiny_sd["root"] / "base"
    instance = cached_rows(base, workdir, "a red circle", 2)
    classes = cached_rows(base, workdir, "a blue square", 2)
    return base, workdir, {"latents": instance, "class_images": classes}


def expected_loss(recorder: StepRecorder, target) -> torch.Tensor:
    """instance MSE + WEIGHT x prior MSE, from the step's own draws and predictions."""
    (instance, prior), (pred_i, pred_p) = recorder.inputs, recorder.predictions
    instance_mse = F.mse_loss(pred_i.float(), target(instance).float())
    prior_mse = F.mse_loss(pred_p.float(), target(prior).float())
    assert prior_mse > 0 and instance_mse > 0
    return instance_mse + WEIGHT * prior_mse


def test_ddpm_step_loss_is_instance_plus_weighted_prior(sd_rows, tmp_path, monkeypatch):
    base, workdir, upstream = sd_rows
    config = prior_config(
        base, "a blue square", 2, f"train.prior_preservation.loss_weight={WEIGHT}"
    )
    recorder = StepRecorder(monkeypatch, UNet2DConditionModel)
    summary = train_unet(config, upstream, str(workdir), tmp_path / "out")
    assert len(recorder.predictions) == 2  # one denoiser call per part
    expected = expected_loss(recorder, lambda inputs: inputs.noise)  # epsilon prediction
    assert summary.history[0][1] == pytest.approx(expected.item(), rel=1e-5)


def test_flow_step_loss_is_instance_plus_weighted_prior(tiny_sd3, tmp_path, monkeypatch):
    instance = cached_rows(tiny_sd3, tmp_path, "a red circle", 2)
    classes = cached_rows(tiny_sd3, tmp_path, "a blue square", 2)
    upstream = {"latents": instance, "class_images": classes}
    config = prior_config(
        tiny_sd3, "a blue square", 2, f"train.prior_preservation.loss_weight={WEIGHT}"
    )
    recorder = StepRecorder(monkeypatch, SD3Transformer2DModel)
    summary = train_unet(config, upstream, str(tmp_path), tmp_path / "out")
    # rectified flow (weighting none): the target is noise - latents
    expected = expected_loss(recorder, lambda inputs: inputs.noise - inputs.latents)
    assert summary.history[0][1] == pytest.approx(expected.item(), rel=1e-5)


def test_a_resumed_prior_run_reaches_the_uninterrupted_weights(sd_rows, tmp_path):
    base, workdir, upstream = sd_rows
    steps = ["train.checkpoint_every=1", "train.batch_size=1"]
    config = prior_config(base, "a blue square", 2, *steps, "train.max_steps=2")
    train_unet(config, upstream, str(workdir), tmp_path / "whole")
    half = prior_config(base, "a blue square", 2, *steps, "train.max_steps=1")
    train_unet(half, upstream, str(workdir), tmp_path / "resumed")  # killed after step 1
    summary = train_unet(config, upstream, str(workdir), tmp_path / "resumed")
    assert summary.resumed_from == 1
    whole = load_latest(tmp_path / "whole" / "checkpoints")[1]["model"]
    resumed = load_latest(tmp_path / "resumed" / "checkpoints")[1]["model"]
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
