"""The prior-preservation step: its loss recomputed here from what the step drew and predicted
(DreamBooth's two-part loss as diffusers' train_dreambooth.py writes it: instance MSE + weight x
prior MSE, each a mean over its own rows), for a DDPM family and a rectified-flow family, and exact
resume with class rows in the batches.

The instance and class rows both come from class_images stage outputs (the latents cache's format)
of folders of plain images encoded by the tiny pipelines, with different prompts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from fixtures.prior import StepRecorder, prior_config
from PIL import Image

from sdflow.store.checkpoints import load_latest
from sdflow.training.loop import train_unet
from tasks.class_images import make_class_images

WEIGHT = 0.7
COLORS = {
    "instance": [(255, 0, 0), (0, 128, 255)],
    "class": [(0, 0, 255), (255, 255, 0), (9, 9, 9)],
}


def cached_rows(pipeline, folder, workdir, prompt: str) -> dict:
    """A folder of plain-colour images encoded by the class_images stage (the latents format)."""
    folder.mkdir(exist_ok=True)
    colors = COLORS[folder.name]
    for i, color in enumerate(colors):
        image = Image.new("RGB", (32, 32), color)
        image.paste((255, 255, 255), (4 * i, 4 * i, 12 + 4 * i, 20))  # not one flat colour
        image.save(folder / f"{i}.png")
    directory = f"train.prior_preservation.class_images_dir={folder}"
    config = prior_config(pipeline, prompt, len(colors), directory)
    return make_class_images(config, {}, str(workdir))


def two_part_rows(pipeline, workdir) -> dict:
    instance = cached_rows(pipeline, workdir / "instance", workdir, "a red circle")
    classes = cached_rows(pipeline, workdir / "class", workdir, "a blue square")
    return {"latents": instance, "class_images": classes}


def expected_loss(recorder: StepRecorder, target) -> torch.Tensor:
    """instance MSE + WEIGHT x prior MSE, from the step's own draws and predictions."""
    (instance, prior), (pred_i, pred_p) = recorder.inputs[:2], recorder.predictions[:2]
    instance_mse = F.mse_loss(pred_i.float(), target(instance).float())
    prior_mse = F.mse_loss(pred_p.float(), target(prior).float())
    assert prior_mse > 0 and instance_mse > 0
    return instance_mse + WEIGHT * prior_mse


def test_ddpm_step_loss_is_instance_plus_weighted_prior_and_resumes(tiny_sd, tmp_path, monkeypatch):
    base = tiny_sd["root"] / "base"
    upstream = two_part_rows(base, tmp_path)
    options = [f"train.prior_preservation.loss_weight={WEIGHT}", "train.batch_size=2"]
    half = prior_config(base, "a blue square", 3, *options, "train.max_steps=1")
    recorder = StepRecorder(monkeypatch, UNet2DConditionModel)
    summary = train_unet(half, upstream, str(tmp_path), tmp_path / "resumed")  # killed after 1
    assert len(recorder.predictions) == 2  # one denoiser call per part
    expected = expected_loss(recorder, lambda inputs: inputs.noise)  # epsilon prediction
    assert summary.history[0][1] == pytest.approx(expected.item(), rel=1e-5)
    # resumed from step 1, the class rows of step 2 are those of an uninterrupted run
    whole = prior_config(base, "a blue square", 3, *options, "train.max_steps=2")
    train_unet(whole, upstream, str(tmp_path), tmp_path / "whole")
    assert train_unet(whole, upstream, str(tmp_path), tmp_path / "resumed").resumed_from == 1
    weights = [load_latest(tmp_path / r / "checkpoints")[1]["model"] for r in ("whole", "resumed")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_flow_step_loss_is_instance_plus_weighted_prior(tiny_sd3, tmp_path, monkeypatch):
    upstream = two_part_rows(tiny_sd3, tmp_path)
    config = prior_config(
        tiny_sd3, "a blue square", 3, f"train.prior_preservation.loss_weight={WEIGHT}"
    )
    recorder = StepRecorder(monkeypatch, SD3Transformer2DModel)
    summary = train_unet(config, upstream, str(tmp_path), tmp_path / "out")
    # rectified flow (weighting none): the target is noise - latents
    expected = expected_loss(recorder, lambda inputs: inputs.noise - inputs.latents)
    assert summary.history[0][1] == pytest.approx(expected.item(), rel=1e-5)
