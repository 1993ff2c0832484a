"""Validation during training (issue 8 §4) and the memory options (§7), on the tiny train fixtures."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline
from fixtures.stages import crash_at_checkpoint
from fixtures.training import (
    make_latents,
    pretrained_config,
    scratch_config,
    stage_path,
    unet_inputs,
)
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import sdflow.training.memory as memory
import sdflow.training.optimizers as optimizers
from sdflow.errors import UserError
from sdflow.models.components import build_unet, component_sources
from sdflow.models.schedulers import noise_scheduler
from sdflow.profiles import ConfigError, load_profile
from sdflow.store.checkpoints import list_checkpoints, load_checkpoint, step_name
from sdflow.training.validation import ValidationState, Validator, spread_timesteps
from tasks.evaluate import describe_model
from tasks.train import train, train_key, train_lineage

pytestmark = pytest.mark.usefixtures("one_torch_thread")
UNET = "unet/diffusion_pytorch_model.safetensors"
# a from-scratch UNet on 2 training rows for many steps: it memorises them and the held-out loss
# turns up after about 100 steps (lr 3e-3), while the training loss keeps falling
OVERFIT = [
    "train.batch_size=2",
    "train.lr=0.003",
    "train.max_steps=400",
    "train.checkpoint_every=1000",
    "train.validate_every=10",
    "train.validation_images=1",
    "train.validation_inference_steps=1",
]


def upstream_with_held_out(workdir: Path, tiny_sd: dict, rows=(2,), held_out: int = 16):
    latents = make_latents(workdir, tiny_sd, rows=rows, held_out=held_out)
    return {"latents": latents, "autoencoder": None, "caption": None}


def validator(config, upstream, workdir: Path, out_dir: Path) -> Validator:
    sources = component_sources(config, upstream, str(workdir))
    return Validator(
        config, upstream, str(workdir), sources, noise_scheduler(config, sources), out_dir
    )


def accelerator() -> SimpleNamespace:
    from contextlib import nullcontext

    return SimpleNamespace(device=torch.device("cpu"), autocast=nullcontext)


def mse_by_hand(
    unet, x: torch.Tensor, text: torch.Tensor, t: torch.Tensor, seed: int, generator=None
) -> float:
    """The epsilon-prediction MSE at timesteps `t`, with SD's scaled-linear schedule written out
    (the noise from `generator`, else a fresh one seeded `seed`)."""
    eps = torch.randn(x.shape, generator=generator or torch.Generator().manual_seed(seed))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    abar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * x + (1 - abar).sqrt() * eps
    with torch.no_grad():
        pred = unet(noisy, t, text).sample
    return float(((pred - eps) ** 2).mean())


def exported_unet(config, path: Path) -> torch.nn.Module:
    unet = build_unet(config.model)
    unet.load_state_dict(load_file(path / UNET))
    return unet.eval()


# ------------------------------------------------------------------------------ validation loss


def test_timesteps_are_spread_evenly_over_the_schedule():
    assert spread_timesteps(4, 1000).tolist() == [125, 375, 625, 875]
    assert spread_timesteps(1, 1000).tolist() == [500]


def test_the_validation_loss_is_deterministic_and_is_the_held_out_mse(tmp_path, tiny_sd):
    config = scratch_config(tiny_sd, "train.validate_every=1", "train.validation_samples=6")
    upstream = upstream_with_held_out(tmp_path, tiny_sd, held_out=10)
    unet = build_unet(config.model).eval()
    first = validator(config, upstream, tmp_path, tmp_path).loss(unet, accelerator())
    again = validator(config, upstream, tmp_path, tmp_path).loss(unet, accelerator())
    assert first == again  # a fresh validator, the same weights: the same number
    # by hand: the first 6 held-out rows, VAE means scaled by 0.5, noise from the seed,
    # x_t = sqrt(abar) x + sqrt(1 - abar) eps at the spread timesteps, epsilon target
    held = load_file(
        stage_path(tmp_path, upstream["latents"]) / "validation/latents-00000.safetensors"
    )
    t = torch.tensor([83, 250, 416, 583, 750, 916])
    expected = mse_by_hand(unet, held["mean"][:6] * 0.5, held["text"][:6], t, config.train.seed)
    assert first == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        unet.conv_in.bias.add_(0.1)
    assert validator(config, upstream, tmp_path, tmp_path).loss(unet, accelerator()) != first


def test_the_validation_loss_covers_held_out_rows_of_several_buckets(tmp_path, tiny_sd):
    config = scratch_config(tiny_sd, "train.validate_every=1", "train.validation_samples=6")
    latents = make_latents(tmp_path, tiny_sd, held_out=6, buckets=True)
    upstream = {"latents": latents, "autoencoder": None, "caption": None}
    unet = build_unet(config.model).eval()
    loss = validator(config, upstream, tmp_path, tmp_path).loss(unet, accelerator())
    # by hand: rows j and j + 3 share a bucket (32x32, 32x16, 16x32 px); each bucket's rows are one
    # batch, its noise drawn in turn from one generator, the spread timesteps kept per row
    held = load_file(stage_path(tmp_path, latents) / "validation/latents-00000.safetensors")
    t = torch.tensor([83, 250, 416, 583, 750, 916])
    generator = torch.Generator().manual_seed(config.train.seed)
    by_bucket = [
        mse_by_hand(unet, held[f"mean@{b}"] * 0.5, held["text"][rows], t[rows], 0, generator)
        for b, rows in (("32x32", [0, 3]), ("32x16", [1, 4]), ("16x32", [2, 5]))
    ]
    assert held["mean@32x16"].shape == (2, 4, 4, 8)
    assert loss == pytest.approx(sum(by_bucket) / 3, rel=1e-5)


@pytest.mark.slow
def test_overfitting_run_exports_the_minimum_and_stops_early(tmp_path, tiny_sd):
    config = scratch_config(
        tiny_sd, *OVERFIT, "train.keep_best=true", "train.early_stop_patience=3"
    )
    upstream = upstream_with_held_out(tmp_path, tiny_sd)
    manifest = train(config, upstream, str(tmp_path))
    out = stage_path(tmp_path, manifest)
    validation = manifest["info"]["validation"]
    curve = validation["curve"]
    steps, losses = [int(s) for s, _ in curve], [v for _, v in curve]
    assert steps == list(range(10, steps[-1] + 1, 10))
    lowest = steps[losses.index(min(losses))]
    # the held-out loss fell, then turned up; early stop ended the run 3 validations later
    assert losses[0] > min(losses) < losses[-1] and 10 < lowest < steps[-1]
    assert validation["best_step"] == lowest and validation["best_loss"] == min(losses)
    assert all(v > min(losses) for v in losses[-3:])
    assert manifest["counts"]["steps"] == lowest + 30 == validation["stopped_early_at"] < 400
    # meanwhile the training loss kept falling: in the run's record, and measured without noise
    # on the 2 training rows (16 fixed noises and timesteps) for the best and the last model
    _, last = load_checkpoint(out / "checkpoints" / step_name(lowest + 30))
    train_losses = [loss for _, loss, _ in last["progress"]["history"]]
    assert sum(train_losses[-20:]) < sum(train_losses[:20]) / 2
    rows = load_file(stage_path(tmp_path, upstream["latents"]) / "latents-00000.safetensors")
    x, text = rows["mean"].repeat(8, 1, 1, 1) * 0.5, rows["text"].repeat(8, 1, 1)
    t = torch.arange(16) * 62 + 31
    best_fit, last_fit = (
        mse_by_hand(exported_unet(config, out / name), x, text, t, seed=1)
        for name in ("pipeline", "final-pipeline")
    )
    assert last_fit < best_fit
    # the best checkpoint stays beside the last; the model is the best, final-pipeline the last
    assert list_checkpoints(out / "checkpoints") == [lowest, lowest + 30]
    assert manifest["files"]["pipeline"] == "pipeline"
    assert manifest["files"]["final_pipeline"] == "final-pipeline"
    for name, step in (("pipeline", lowest), ("final-pipeline", lowest + 30)):
        saved = load_file(out / name / UNET)
        _, state = load_checkpoint(out / "checkpoints" / step_name(step))
        assert all(torch.equal(saved[k], state["model"][k]) for k in state["model"])
    # evaluated again, the exported models give the losses the curve recorded at their steps
    check = validator(config, upstream, tmp_path, tmp_path / "check")
    assert check.loss(exported_unet(config, out / "pipeline"), accelerator()) == min(losses)
    assert check.loss(exported_unet(config, out / "final-pipeline"), accelerator()) == losses[-1]
    # a grid per validation under logs/, the newest one named in the manifest
    grids = sorted((out / "logs" / "validation").glob("step-*.png"))
    assert [g.name for g in grids] == [f"{step_name(s)}.png" for s in steps]
    assert manifest["files"]["validation_grid"] == f"logs/validation/{step_name(steps[-1])}.png"
    with Image.open(grids[-1]) as grid:
        assert grid.format == "PNG" and len(set(grid.convert("RGB").get_flattened_data())) > 10
    # evaluate scores the last step's model unless eval.checkpoints is best
    assert f"{lowest + 30} steps" in describe_model("trained", config, manifest)
    best = config.model_copy(
        update={"eval": config.eval.model_copy(update={"checkpoints": "best"})}
    )
    assert f"best validation loss at step {lowest} of" in describe_model("trained", best, manifest)


def test_a_resumed_run_validates_and_exports_as_an_uninterrupted_one(
    tmp_path, tiny_sd, monkeypatch
):
    config = scratch_config(
        tiny_sd,
        "train.max_steps=24",
        "train.validate_every=4",
        "train.checkpoint_every=8",
        "train.keep_best=true",
        "train.ema=true",
        "train.ema_decay=0.9",
        "train.validation_images=0",
    )
    reference = train(config, upstream_with_held_out(tmp_path / "a", tiny_sd), str(tmp_path / "a"))
    undo = crash_at_checkpoint(monkeypatch, 16)
    workdir = tmp_path / "b"
    upstream = upstream_with_held_out(workdir, tiny_sd)
    with pytest.raises(OSError):
        train(config, upstream, str(workdir))
    partial = next((workdir / "stages" / "train").glob(".*.partial"))
    step, saved = max(
        (
            load_checkpoint(partial / "checkpoints" / step_name(s))
            for s in list_checkpoints(partial / "checkpoints")
        ),
        key=lambda found: found[0],
    )
    assert step < 16 and [s for s, _ in saved["validation"]["curve"]] == list(range(4, step + 1, 4))
    undo()
    resumed = train(config, upstream, str(workdir))
    assert resumed["info"]["resumed_from_step"] == step
    assert resumed["info"]["validation"] == reference["info"]["validation"]  # curve, best, bitwise
    assert resumed["files"] == reference["files"]
    for name in {reference["files"]["pipeline"], reference["files"].get("final_pipeline")} - {None}:
        a = load_file(stage_path(tmp_path / "a", reference) / name / UNET)
        b = load_file(stage_path(workdir, resumed) / name / UNET)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["fingerprint"] == reference["fingerprint"]


# ---------------------------------------------------------------------------------- config, keys


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["train.keep_best=true"], "train.keep_best is True but train.validate_every is 0"),
        (["train.early_stop_patience=2"], "train.early_stop_patience is 2"),
        (["train.validate_every=5", "train.cache_latents=false"], "train.cache_latents is false"),
        (["train.validate_every=5", "eval.held_out_fraction=0"], "eval.held_out_fraction is 0"),
    ],
)
def test_validation_settings_that_cannot_work_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        load_profile("tiny-test", options)


def test_validation_settings_are_in_the_key_but_not_the_lineage(tmp_path, tiny_sd):
    upstream = upstream_with_held_out(tmp_path, tiny_sd)
    plain = scratch_config(tiny_sd)
    validated = scratch_config(tiny_sd, "train.validate_every=2", "train.keep_best=true")
    assert train_lineage(validated, upstream) == train_lineage(plain, upstream)
    assert train_key(validated, upstream) != train_key(plain, upstream)


def test_no_held_out_rows_is_a_user_error_before_training(tmp_path, tiny_sd):
    config = scratch_config(tiny_sd, "train.validate_every=2")
    upstream = {"latents": make_latents(tmp_path, tiny_sd), "autoencoder": None, "caption": None}
    with pytest.raises(UserError, match="cached no held-out samples"):
        train(config, upstream, str(tmp_path))
    assert not list((tmp_path / "stages" / "train").rglob("step-*"))


# ------------------------------------------------------------------------------- memory options


def test_adamw8bit_without_cuda_is_refused_before_any_work(tmp_path, tiny_sd, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = scratch_config(tiny_sd, "train.optimizer=adamw8bit")
    upstream = {"latents": make_latents(tmp_path, tiny_sd), "autoencoder": None, "caption": None}
    with pytest.raises(UserError, match="train.optimizer is 'adamw8bit'.*needs a CUDA GPU"):
        train(config, upstream, str(tmp_path))
    assert not list((tmp_path / "stages" / "train").rglob("step-*"))
    # with CUDA but without the package, the message says how to install it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(optimizers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        UserError, match=r"bitsandbytes is not installed: pip install -e '\.\[gpu\]'"
    ):
        optimizers.check_optimizer(config.train)


def test_ema_on_cpu_gives_the_same_ema(tmp_path, tiny_sd):
    runs = {}
    for flag in ("false", "true"):
        config = scratch_config(
            tiny_sd, "train.ema=true", "train.ema_decay=0.9", f"train.ema_on_cpu={flag}"
        )
        upstream = {"latents": make_latents(tmp_path / flag, tiny_sd), "autoencoder": None}
        upstream["caption"] = None
        manifest = train(config, upstream, str(tmp_path / flag))
        _, state = load_checkpoint(
            stage_path(tmp_path / flag, manifest) / "checkpoints" / step_name(4)
        )
        runs[flag] = state["ema"]
    on_device, on_cpu = runs["false"], runs["true"]
    assert on_cpu["optimization_step"] == on_device["optimization_step"] == 4
    shadows = zip(on_device["shadow_params"], on_cpu["shadow_params"], strict=True)
    assert all(torch.equal(a, b) for a, b in shadows)


def test_cpu_ema_averages_device_weights_on_the_cpu():
    """EMA kept on the CPU averages a parameter of another device as EMAModel does on-device."""
    weight = torch.nn.Parameter(torch.ones(3))
    ema = memory.make_ema(
        load_profile("tiny-test", ["train.ema=true", "train.ema_on_cpu=true"]).train, [weight]
    )
    ema.to("meta")  # asked to move: stays on the CPU
    assert ema.shadow_params[0].device.type == "cpu"
    with torch.no_grad():
        weight.fill_(3.0)
    ema.step([weight])  # diffusers' EMA takes the weights as they are at its first step
    with torch.no_grad():
        weight.fill_(5.0)
    ema.step([weight])
    decay = (1 + 1) / (10 + 1)  # diffusers' EMA warmup at its second step: (1 + t) / (10 + t)
    expected = 3.0 + (1 - decay) * (5.0 - 3.0)
    assert ema.shadow_params[0].tolist() == pytest.approx([expected] * 3)
    assert not math.isclose(expected, 1.0)


def test_lora_run_validates_and_exports_the_best_adapter_beside_the_last(
    tmp_path, tiny_sd, caplog, monkeypatch
):
    config = pretrained_config(
        tiny_sd,
        "train.mode=lora",
        "train.lr=0.01",
        "train.max_steps=6",
        "train.validate_every=2",
        "train.keep_best=true",
        "train.validation_images=2",
        "train.validation_inference_steps=1",
    )
    # A few LoRA steps only lower the held-out loss; from the second validation on it reads 1 more
    # than measured, so the best step (2) is not the last (6) and both adapters are exported.
    real, validations = Validator.loss, []

    def turning_up(self, unet, accelerator) -> float:
        validations.append(1)
        return real(self, unet, accelerator) + (1.0 if len(validations) > 1 else 0.0)

    monkeypatch.setattr(Validator, "loss", turning_up)
    upstream = upstream_with_held_out(tmp_path, tiny_sd, rows=(4,))
    with caplog.at_level(logging.INFO, logger="sdflow.train"):
        manifest = train(config, upstream, str(tmp_path))
    out = stage_path(tmp_path, manifest)
    validation = manifest["info"]["validation"]
    assert [s for s, _ in validation["curve"]] == [2, 4, 6]
    # the curve in the run log and in TensorBoard
    for step, loss in validation["curve"]:
        assert f"validation at step {step}: loss {loss:.5f}" in caplog.text
    (events,) = (out / "logs" / "train").glob("events.out.tfevents.*")
    logged = EventAccumulator(str(events)).Reload().Scalars("validation_loss")
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in logged] == [
        (s, v) for s, v in validation["curve"]
    ]
    assert validation["best_step"] == 2
    assert (manifest["files"]["lora"], manifest["files"]["final_lora"]) == ("lora", "final-lora")
    assert list_checkpoints(out / "checkpoints") == [2, 6]  # the best kept beside the last

    # lora/ is step 2's adapter, final-lora/ step 6's (under diffusers' names: compared by values)
    def values(tensors) -> list:
        return sorted((tuple(t.shape), float(t.double().sum())) for t in tensors.values())

    exported = {}
    for name, step in (("lora", 2), ("final-lora", 6)):
        exported[name] = load_file(out / name / "pytorch_lora_weights.safetensors")
        _, state = load_checkpoint(out / "checkpoints" / step_name(step))
        assert values(exported[name]) == values(state["model"])
    assert values(exported["lora"]) != values(exported["final-lora"])
    # each loads on the base with diffusers, and the two change the base's output differently
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd["root"] / "base")
    outputs = []
    for name in (None, "lora", "final-lora"):
        if name:
            pipe.unload_lora_weights()
            pipe.load_lora_weights(out / name)
        with torch.no_grad():
            outputs.append(pipe.unet(*unet_inputs(pipe.unet)).sample)
    base, best, last = outputs
    assert not torch.equal(best, base) and not torch.equal(last, base)
    assert not torch.equal(best, last)
    with Image.open(out / manifest["files"]["validation_grid"]) as grid:
        assert grid.width > 2 * 96  # two prompts side by side


def test_validating_changes_no_weight(tmp_path, tiny_sd):
    """Validation draws from neither the training generator nor the global RNG (the lineage
    leaves it out): the same run with and without it ends with the same weights, bitwise."""
    extra = ["train.max_steps=6", "train.caption_dropout=0.3", "train.noise_offset=0.05"]
    ends = []
    for name, options in (("plain", []), ("validated", ["train.validate_every=2"])):
        config = scratch_config(tiny_sd, *extra, *options)
        manifest = train(
            config, upstream_with_held_out(tmp_path / name, tiny_sd), str(tmp_path / name)
        )
        ends.append(load_file(stage_path(tmp_path / name, manifest) / "pipeline" / UNET))
        assert ("validation" in manifest["info"]) is bool(options)
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])


def test_best_patience_and_a_lifted_early_stop():
    state = ValidationState()
    decisions = [
        state.record(step, loss) for step, loss in [(2, 0.5), (4, 0.4), (6, 0.45), (8, 0.4)]
    ]
    assert decisions == [True, True, False, False]  # equal to the best is no improvement
    assert (state.best_step, state.best_loss, state.since_best) == (4, 0.4, 2)
    state.stopped_at = 8  # early_stop_patience 2 ended the run here
    state.reconsider(2)
    assert state.stopped_at == 8  # resumed with the same patience: still stopped
    state.reconsider(5)
    assert state.stopped_at is None  # continued with more patience: trains on
