"""Train stage: scratch / full fine-tune / LoRA on a tiny latents fixture, crash and exact resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from fixtures.pipelines import seeded_image
from fixtures.stages import crash_at_checkpoint, make_captions
from fixtures.training import (
    make_latents,
    pretrained_config,
    run_train,
    scratch_config,
    stage_path,
    unet_inputs,
)
from peft import LoraConfig
from PIL import Image
from safetensors.torch import load_file

from sdflow.errors import UserError
from sdflow.models.components import build_unet
from sdflow.models.files import save_pipeline
from sdflow.store.checkpoints import list_checkpoints, load_checkpoint, load_latest, step_name
from sdflow.store.splits import is_held_out
from tasks.train import train, train_key, train_lineage

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def v_base(tiny_sd) -> Path:
    """The tiny base pipeline re-saved with its own inference scheduler: Euler, v-prediction."""
    root = tiny_sd["root"]
    base = StableDiffusionPipeline.from_pretrained(root / "base", safety_checker=None)
    scheduler = EulerDiscreteScheduler.from_config(
        base.scheduler.config, prediction_type="v_prediction", timestep_spacing="trailing"
    )
    save_pipeline(
        root / "v-base", base.unet, base.vae, base.text_encoder, base.tokenizer, scheduler
    )
    return root / "v-base"


def scheduler_config(pipeline: Path) -> dict:
    return json.loads((pipeline / "scheduler" / "scheduler_config.json").read_text())


def sample_25_steps(pipeline: Path) -> np.ndarray:
    """A plain `pipe(prompt)` with the saved scheduler: 25 steps, default guidance."""
    pipe = StableDiffusionPipeline.from_pretrained(pipeline, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", 32, 32, 25, output_type="np").images[0]
    assert len(pipe.scheduler.timesteps) == 25
    return image


def generate(pipe: StableDiffusionPipeline) -> np.ndarray:
    return seeded_image(pipe, guidance_scale=2.0)


# ---------------------------------------------------------------------------------- data order


# ------------------------------------------------------------------------------------- outputs


def test_scratch_training_writes_a_pipeline_that_generates(tmp_path, tiny_sd):
    config = scratch_config(
        tiny_sd,
        "train.ema=true",
        "train.ema_decay=0.9",
        "train.snr_gamma=5.0",
        "train.noise_offset=0.1",
        "train.caption_dropout=0.5",
        "train.gradient_accumulation=2",
        "train.lr_scheduler=cosine",
        "train.warmup_steps=1",
    )
    manifest, _ = run_train(config, tmp_path, tiny_sd)
    out = stage_path(tmp_path, manifest)
    every_weight = sum(p.numel() for p in build_unet(config.model).parameters())
    assert manifest["counts"] == {
        "steps": 4,
        "samples_seen": 4 * 4 * 2,
        "trainable_params": every_weight,  # from scratch, the whole UNet trains
    }
    assert manifest["info"]["mode"] == "scratch"
    assert list_checkpoints(out / "checkpoints") == [4]  # only the last one is kept
    with Image.open(out / manifest["files"]["loss_curve"]) as curve:
        assert curve.format == "PNG" and curve.size == (640, 360)
        assert len(set(curve.convert("RGB").get_flattened_data())) > 2  # axes, curve, labels
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    # The pipeline holds the EMA weights, not the raw trained ones.
    _, state = load_checkpoint(out / "checkpoints" / "step-000004")
    # the final loss is the last step's (log_every 1), as the checkpoint recorded it
    assert manifest["info"]["final_loss"] == state["progress"]["history"][-1][1]
    saved = load_file(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    name = "conv_in.weight"
    index = list(state["model"]).index(name)
    assert torch.equal(saved[name], state["ema"]["shadow_params"][index])
    assert not torch.equal(saved[name], state["model"][name])
    # It samples with DDIM on the training noise schedule (SD's), not with the training DDPM.
    saved = scheduler_config(out / "pipeline")
    assert saved["_class_name"] == "DDIMScheduler"
    assert saved["prediction_type"] == "epsilon"
    assert (saved["beta_schedule"], saved["beta_start"], saved["beta_end"]) == (
        "scaled_linear",
        0.00085,
        0.012,
    )
    assert saved["num_train_timesteps"] == 1000
    image = sample_25_steps(out / "pipeline")
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_full_finetune_from_pretrained_changes_the_unet(tmp_path, tiny_sd):
    config = pretrained_config(tiny_sd, "train.prediction_type=v_prediction", "train.snr_gamma=5.0")
    manifest, _ = run_train(config, tmp_path, tiny_sd)
    out = stage_path(tmp_path, manifest)
    assert manifest["info"]["mode"] == "full"
    assert manifest["info"]["base_model"] == str(tiny_sd["root"] / "base")
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline", safety_checker=None)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    base = load_file(tiny_sd["root"] / "base" / "unet" / "diffusion_pytorch_model.safetensors")
    tuned = load_file(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert base.keys() == tuned.keys()
    assert not torch.equal(base["conv_in.weight"], tuned["conv_in.weight"])


def test_lora_weights_load_on_the_base_and_change_its_output(tmp_path, tiny_sd):
    config = pretrained_config(tiny_sd, "train.mode=lora", "train.lr=0.01", "train.lora_rank=2")
    manifest, _ = run_train(config, tmp_path, tiny_sd)
    out = stage_path(tmp_path, manifest)
    assert manifest["info"]["mode"] == "lora"
    assert "pipeline" not in manifest["files"]
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert lora and all("lora" in k for k in lora)
    assert sum(v.numel() for v in lora.values()) == manifest["counts"]["trainable_params"]
    total = sum(v.numel() for v in build_unet(config.model).parameters())
    assert manifest["counts"]["trainable_params"] < total / 10
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd["root"] / "base", safety_checker=None)
    before = generate(pipe)
    pipe.load_lora_weights(out / "lora")
    after = generate(pipe)
    assert np.abs(before - after).max() > 1e-4


def test_training_without_the_cache_encodes_images_on_the_fly(tmp_path, tiny_sd):
    config = pretrained_config(tiny_sd, "train.cache_latents=false")
    fraction = config.eval.held_out_fraction
    training = [i for i in range(12) if not is_held_out(f"img-{i}", fraction)]
    epoch = -(-len(training) // 4)  # batches of 4, the last one smaller
    config.train.max_steps = epoch
    manifest, _ = run_train(config, tmp_path, tiny_sd, {"caption": make_captions(tmp_path)})
    assert len(training) % 4 and manifest["counts"]["samples_seen"] == len(training)
    _, state = load_checkpoint(stage_path(tmp_path, manifest) / "checkpoints" / step_name(epoch))
    assert manifest["info"]["final_loss"] == state["progress"]["history"][-1][1]  # log_every 1
    assert (stage_path(tmp_path, manifest) / "pipeline" / "model_index.json").is_file()


def test_key_ignores_bookkeeping_settings_but_not_training_ones(tmp_path, tiny_sd):
    upstream = {"latents": make_latents(tmp_path, tiny_sd), "autoencoder": None, "caption": None}
    key = train_key(scratch_config(tiny_sd), upstream)
    bookkeeping = ["keep_checkpoints=5", "data_workers=2", "log_every=3", "checkpoint_every=3"]
    same = scratch_config(tiny_sd, *(f"train.{o}" for o in bookkeeping))
    assert train_key(same, upstream) == key
    assert train_key(scratch_config(tiny_sd, "train.lr=0.002"), upstream) != key
    assert train_key(scratch_config(tiny_sd, "model.seed=1"), upstream) != key
    # more steps: another output, of the same lineage while the lr schedule ignores the total
    longer = scratch_config(tiny_sd, "train.max_steps=8")
    assert train_key(longer, upstream) != key
    lineage = train_lineage(scratch_config(tiny_sd), upstream)
    assert train_lineage(longer, upstream) == lineage
    assert train_lineage(scratch_config(tiny_sd, "train.lr=0.002"), upstream) != lineage
    cosine = [
        scratch_config(tiny_sd, "train.lr_scheduler=cosine", f"train.max_steps={n}") for n in (4, 8)
    ]
    assert train_lineage(cosine[0], upstream) != train_lineage(cosine[1], upstream)


@pytest.mark.slow
def test_raising_max_steps_continues_and_matches_a_straight_run(tmp_path, tiny_sd, caplog):
    extra = ["train.ema=true", "train.ema_decay=0.9", "train.caption_dropout=0.3"]
    extra += ["train.noise_offset=0.05", "train.checkpoint_every=10", "train.log_every=10"]
    # bitwise needs Adam's moments at step 30; by default a finished run drops them (disk)
    extra += ["train.keep_optimizer_state=true"]
    straight, _ = run_train(
        scratch_config(tiny_sd, "train.max_steps=60", *extra), tmp_path / "a", tiny_sd
    )
    workdir = tmp_path / "b"
    first, upstream = run_train(
        scratch_config(tiny_sd, "train.max_steps=30", *extra), workdir, tiny_sd
    )
    first_dir = stage_path(workdir, first)
    before = {p: p.read_bytes() for p in (first_dir / "checkpoints").rglob("*") if p.is_file()}
    with caplog.at_level(logging.INFO, logger="sdflow.train"):
        longer = train(
            scratch_config(tiny_sd, "train.max_steps=60", *extra), upstream, str(workdir)
        )
    assert f"Continuing training from the finished run {first_dir.name} at step 30" in caplog.text
    assert "Resuming training from the checkpoint of step 30" in caplog.text
    assert longer["info"]["continued_from"] == {"key": first_dir.name, "step": 30}
    assert longer["info"]["resumed_from_step"] == 30
    assert straight["info"]["continued_from"] is None
    assert longer["counts"] == straight["counts"]
    weights = "pipeline/unet/diffusion_pytorch_model.safetensors"  # the EMA weights
    a = load_file(stage_path(tmp_path / "a", straight) / weights)
    b = load_file(stage_path(workdir, longer) / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _, end_a = load_checkpoint(stage_path(tmp_path / "a", straight) / "checkpoints" / "step-000060")
    _, end_b = load_checkpoint(stage_path(workdir, longer) / "checkpoints" / "step-000060")
    assert all(torch.equal(end_a["model"][k], end_b["model"][k]) for k in end_a["model"])
    assert end_a["progress"]["history"] == end_b["progress"]["history"]  # losses and lrs
    # the 30-step output is untouched, and asking for 30 steps again is a cache hit
    assert {p: p.read_bytes() for p in before} == before
    again = train(scratch_config(tiny_sd, "train.max_steps=30", *extra), upstream, str(workdir))
    assert again["reused"] is True and again["path"] == first["path"]


def test_lora_targets_that_match_nothing_are_a_user_error(tmp_path, tiny_sd):
    config = pretrained_config(tiny_sd, "train.mode=lora", "train.lora_targets=[nope]")
    with pytest.raises(UserError, match="lora_targets"):
        run_train(config, tmp_path, tiny_sd)


# ------------------------------------------------------------------- fine-tune defects (issue 8)


def recorded_lrs(out: Path, step: int) -> list[float]:
    """The lr each step trained with, as the run recorded it in its checkpoint's history."""
    _, state = load_checkpoint(out / "checkpoints" / step_name(step))
    return [lr for _, _, lr in state["progress"]["history"]]


def test_constant_with_warmup_warms_up_in_a_real_run(tmp_path, tiny_sd):
    config = scratch_config(
        tiny_sd,
        "train.lr_scheduler=constant_with_warmup",
        "train.warmup_steps=4",
        "train.max_steps=5",
    )
    manifest, _ = run_train(config, tmp_path, tiny_sd)
    lrs = recorded_lrs(stage_path(tmp_path, manifest), 5)
    # steps 0, warmup/2 and warmup: 0, half the lr, the lr (tiny-test's lr is 1e-3)
    assert [lrs[0], lrs[2], lrs[4]] == pytest.approx([0.0, 0.5e-3, 1e-3])


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [  # lr 1e-3, warmup 2 of 6 steps: the lr of steps 2, 3 and 4, worked out by hand
        (["train.lr_scheduler=cosine_with_restarts", "train.lr_cycles=2"], [1e-3, 0.5e-3, 1e-3]),
        (
            ["train.lr_scheduler=polynomial", "train.lr_power=2"],
            [1e-3, (1e-3 - 1e-7) * 0.75**2 + 1e-7, (1e-3 - 1e-7) * 0.5**2 + 1e-7],
        ),
    ],
)
def test_restarts_and_polynomial_schedules_in_a_real_run(tmp_path, tiny_sd, schedule, expected):
    config = scratch_config(tiny_sd, *schedule, "train.warmup_steps=2", "train.max_steps=6")
    manifest, _ = run_train(config, tmp_path, tiny_sd)
    lrs = recorded_lrs(stage_path(tmp_path, manifest), 6)
    assert lrs[1] == pytest.approx(0.5e-3)  # warming up
    assert lrs[2:5] == pytest.approx(expected, rel=1e-6)


def test_finetune_of_a_v_prediction_base_stays_v_prediction(tmp_path, tiny_sd, v_base, monkeypatch):
    import sdflow.training.loop as training

    used = []
    real_fit = training.fit

    def spy(trainer, source, scheduler, checkpoints):
        used.append(scheduler.config.prediction_type)
        return real_fit(trainer, source, scheduler, checkpoints)

    monkeypatch.setattr(training, "fit", spy)
    config = pretrained_config(tiny_sd, f"model.pretrained={v_base}", "train.max_steps=2")
    assert config.train.prediction_type is None
    manifest, _ = run_train(config, tmp_path, tiny_sd)
    assert used == ["v_prediction"]  # the loss trained v, as the base does
    assert manifest["info"]["prediction_type"] == "v_prediction"
    pipeline = stage_path(tmp_path, manifest) / "pipeline"
    saved = scheduler_config(pipeline)
    # the base's own sampler and its settings, not the training DDPM
    assert saved["_class_name"] == "EulerDiscreteScheduler"
    assert saved["prediction_type"] == "v_prediction"
    assert saved["timestep_spacing"] == "trailing"
    assert np.isfinite(sample_25_steps(pipeline)).all()


def test_an_explicit_prediction_type_retargets_the_base_and_says_so(
    tmp_path, tiny_sd, v_base, caplog
):
    config = pretrained_config(
        tiny_sd,
        f"model.pretrained={v_base}",
        "train.max_steps=2",
        "train.prediction_type=epsilon",
    )
    with caplog.at_level(logging.WARNING, logger="sdflow.models.schedulers"):
        manifest, _ = run_train(config, tmp_path, tiny_sd)
    assert "train.prediction_type is 'epsilon'" in caplog.text and "'v_prediction'" in caplog.text
    info = manifest["info"]
    assert (info["prediction_type"], info["base_prediction_type"]) == ("epsilon", "v_prediction")
    saved = scheduler_config(stage_path(tmp_path, manifest) / "pipeline")
    assert (saved["_class_name"], saved["prediction_type"]) == ("EulerDiscreteScheduler", "epsilon")


@pytest.mark.parametrize(
    "targets",
    [
        ["to_q", "to_k", "to_v", "to_out.0"],
        # beyond attention: converted to the old diffusers format, the attention part was
        # silently dropped by load_lora_weights next to the conv layers' PEFT-format keys
        ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out", "ff.net.2"],
    ],
)
def test_lora_alpha_survives_the_export(tmp_path, tiny_sd, targets):
    config = pretrained_config(
        tiny_sd,
        "train.mode=lora",
        "train.lr=0.01",
        "train.lora_rank=2",
        "train.lora_alpha=8",
        f"train.lora_targets={json.dumps(targets)}",
    )
    manifest, _ = run_train(config, tmp_path, tiny_sd)
    out = stage_path(tmp_path, manifest)
    base = tiny_sd["root"] / "base"
    # The training-time PEFT UNet, rebuilt by hand: base + adapter (r 2, alpha 8) + trained weights
    reference = UNet2DConditionModel.from_pretrained(base / "unet")
    reference.add_adapter(LoraConfig(r=2, lora_alpha=8, target_modules=targets))
    _, state = load_checkpoint(out / "checkpoints" / step_name(4))
    result = reference.load_state_dict(state["model"], strict=False)
    assert not result.unexpected_keys
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    inputs = unet_inputs(pipe.unet)
    with torch.no_grad():
        before = pipe.unet(*inputs).sample
        expected = reference(*inputs).sample
        pipe.load_lora_weights(out / "lora")
        loaded = pipe.unet(*inputs).sample
    assert (loaded - before).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-4)


def test_skipped_fp16_steps_hold_the_lr_schedule_and_ema(tmp_path, tiny_sd, monkeypatch):
    import dataclasses

    import sdflow.training.loop as training
    import sdflow.training.trainer as trainer
    from sdflow.training import objectives

    ddpm = objectives.OBJECTIVES["ddpm"]
    real_accelerator, real_loss = training.make_accelerator, ddpm.loss
    calls = []

    def with_grad_scaler(train, out_dir):
        accelerator = real_accelerator(train, out_dir)
        # accelerate refuses fp16 on a CPU; the GradScaler it would use works on one
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
        return accelerator

    def inf_gradients_on_step_2(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # step index 2: every gradient becomes inf / NaN
            loss.register_hook(lambda grad: grad * float("inf"))
        return loss

    weights = {}
    real_save = trainer.save_checkpoint

    def keep_weights(root, step, state, keep):
        weights[step] = {k: v.detach().clone() for k, v in state["model"].items()}
        return real_save(root, step, state, keep)

    monkeypatch.setattr(trainer, "save_checkpoint", keep_weights)
    monkeypatch.setattr(training, "make_accelerator", with_grad_scaler)
    with_inf = dataclasses.replace(ddpm, loss=inf_gradients_on_step_2)
    monkeypatch.setitem(objectives.OBJECTIVES, "ddpm", with_inf)
    config = scratch_config(
        tiny_sd,
        "train.lr_scheduler=linear",
        "train.warmup_steps=4",
        "train.max_steps=5",
        "train.checkpoint_every=1",
        "train.ema=true",
    )
    manifest, _ = run_train(config, tmp_path, tiny_sd)
    out = stage_path(tmp_path, manifest)
    # the step after the skipped one trains with the skipped one's lr: the schedule waited
    assert recorded_lrs(out, 5) == pytest.approx([0.0, 0.25e-3, 0.5e-3, 0.5e-3, 0.75e-3])
    _, final = load_checkpoint(out / "checkpoints" / step_name(5))
    assert final["ema"]["optimization_step"] == 4  # five steps, one skipped
    assert final["grad_scaler"]["scale"] == 0.5  # the real scaler backed off once
    before, after = weights[2], weights[3]  # around the skipped step: the weights stayed
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(weights[3][k], weights[4][k]) for k in before)
    assert manifest["info"]["skipped_steps"] == 1


def test_the_kept_checkpoint_drops_the_optimizer_moments_unless_asked(tmp_path, tiny_sd, caplog):
    from sdflow.training.loop import train_unet

    runs = {}
    for flag in ("false", "true"):
        config = scratch_config(tiny_sd, f"train.keep_optimizer_state={flag}", "train.ema=true")
        manifest, upstream = run_train(config, tmp_path / flag, tiny_sd)
        runs[flag] = (stage_path(tmp_path / flag, manifest), manifest)
    (lean_dir, manifest), (full_dir, _) = runs["false"], runs["true"]
    lean, full = (d / "checkpoints" / step_name(4) for d in (lean_dir, full_dir))
    small, big = load_checkpoint(lean)[1], load_checkpoint(full)[1]
    assert set(big) - set(small) == {"optimizer"}
    assert {"model", "ema", "lr_scheduler", "rng", "progress"} <= set(small)
    assert all(torch.equal(small["model"][k], big["model"][k]) for k in big["model"])
    assert not (lean / "optimizer.safetensors").exists()
    # AdamW keeps two fp32 moments per trained weight: that is what the lean checkpoint saves
    moments = 2 * 4 * manifest["counts"]["trainable_params"]
    saved = sum(f.stat().st_size for f in full.iterdir()) - sum(
        f.stat().st_size for f in lean.iterdir()
    )
    assert moments <= saved < moments * 1.05  # plus tensor names and the JSON skeleton
    assert manifest["info"]["optimizer_state_kept"] is False
    # what is left is enough to train on: two more steps from the lean checkpoint
    longer = scratch_config(tiny_sd, "train.max_steps=6", "train.ema=true")
    with caplog.at_level(logging.INFO, logger="sdflow.train"):
        summary = train_unet(longer, upstream, str(tmp_path / "true"), lean_dir)
    assert "holds no optimizer state" in caplog.text
    assert (summary.resumed_from, summary.steps) == (4, 6)


# --------------------------------------------------------------------------------- crash, resume

KILL_SCRIPT = """
import json, os, signal, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
import sdflow.training.trainer as training
from sdflow.config import RunConfig
from sdflow.errors import UserError
from tasks.train import train, train_key, train_lineage
real = training.save_checkpoint

def save_then_die(root, step, state, keep):
    if step == 6:  # die half-way through writing step 6: one file in its temporary dir
        tmp = root / ".tmp-step-000006"
        tmp.mkdir(parents=True)
        (tmp / "model.safetensors").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(root, step, state, keep)

training.save_checkpoint = save_then_die
spec = json.load(open({spec!r}))
train(RunConfig.model_validate(spec["config"]), spec["upstream"], spec["workdir"])
"""


def test_kill_9_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path, tiny_sd, caplog):
    # on latents in three buckets (batches of one shape each, some smaller than train.batch_size)
    config = scratch_config(
        tiny_sd,
        "train.max_steps=8",
        "train.ema=true",
        "train.caption_dropout=0.3",
        "train.noise_offset=0.05",
        "train.lr_scheduler=linear",
        "train.warmup_steps=5",
        "train.gradient_accumulation=2",
    )
    reference, _ = run_train(config, tmp_path / "straight", tiny_sd, buckets=True)

    workdir = tmp_path / "killed"
    latents = make_latents(workdir, tiny_sd, buckets=True)
    upstream = {"latents": latents, "autoencoder": None, "caption": None}
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "config": config.model_dump(mode="json"),
                "upstream": upstream,
                "workdir": str(workdir),
            }
        )
    )
    script = KILL_SCRIPT.format(root=str(ROOT), spec=str(spec))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    partial = next((workdir / "stages" / "train").glob(".*.partial"))
    assert (partial / "checkpoints" / ".tmp-step-000006").exists()
    step, state = load_latest(partial / "checkpoints")
    assert step == 4
    # the learning rate is mid-warmup in the checkpoint, not back at the start
    assert state["lr_scheduler"]["_last_lr"][0] == pytest.approx(1e-3 * 4 / 5)

    with caplog.at_level(logging.INFO, logger="sdflow.train"):
        resumed = train(config, upstream, str(workdir))
    assert "Resuming training from the checkpoint of step 4" in caplog.text
    assert resumed["info"]["resumed_from_step"] == 4
    assert reference["info"]["resumed_from_step"] == 0

    straight_out, resumed_out = (
        stage_path(tmp_path / "straight", reference),
        stage_path(workdir, resumed),
    )
    weights = "pipeline/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(straight_out / weights), load_file(resumed_out / weights)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise, EMA included
    _, final_a = load_checkpoint(straight_out / "checkpoints" / "step-000008")
    _, final_b = load_checkpoint(resumed_out / "checkpoints" / "step-000008")
    assert final_a["progress"]["history"] == final_b["progress"]["history"]  # losses and lrs
    assert all(torch.equal(final_a["model"][k], final_b["model"][k]) for k in final_a["model"])
    assert reference["counts"] == resumed["counts"]
    assert reference["fingerprint"] == resumed["fingerprint"]  # timings and logs stay out of it


@pytest.mark.parametrize("text_encoder", ["frozen", "lora"])
def test_lora_run_interrupted_by_an_error_resumes_to_the_same_adapter(
    tmp_path, tiny_sd, monkeypatch, text_encoder
):
    config = pretrained_config(
        tiny_sd, "train.mode=lora", "train.ema=true", f"train.text_encoder={text_encoder}"
    )
    reference, _ = run_train(config, tmp_path / "straight", tiny_sd)
    undo = crash_at_checkpoint(monkeypatch, 4)
    with pytest.raises(OSError):
        run_train(config, tmp_path / "crashed", tiny_sd)
    undo()
    resumed, _ = run_train(config, tmp_path / "crashed", tiny_sd)
    assert resumed["info"]["resumed_from_step"] == 2
    name = "lora/pytorch_lora_weights.safetensors"
    a = load_file(stage_path(tmp_path / "straight", reference) / name)
    b = load_file(stage_path(tmp_path / "crashed", resumed) / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the text encoder's adapter is in the file (and resumed bitwise) exactly when it trains
    assert any(k.startswith("text_encoder.") for k in a) == (text_encoder == "lora")
    assert reference["fingerprint"] == resumed["fingerprint"]


def test_scoring_every_checkpoint_keeps_them(tmp_path, tiny_sd):
    steps = ["train.max_steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=3"]
    final, _ = run_train(scratch_config(tiny_sd, *steps), tmp_path / "final", tiny_sd)
    every, _ = run_train(
        scratch_config(tiny_sd, *steps, "eval.checkpoints=all"), tmp_path / "all", tiny_sd
    )
    assert list_checkpoints(stage_path(tmp_path / "final", final) / "checkpoints") == [6]
    assert list_checkpoints(stage_path(tmp_path / "all", every) / "checkpoints") == [2, 4, 6]


# ------------------------------------------------------------------------------ speed options


def unet_weights(workdir: Path, manifest: dict) -> dict[str, torch.Tensor]:
    return load_file(
        stage_path(workdir, manifest) / "pipeline/unet/diffusion_pytorch_model.safetensors"
    )


def test_two_data_workers_with_prefetch_train_bitwise_like_none(tmp_path, tiny_sd):
    """Worker processes (pinned memory asked for, ignored without CUDA; prefetch 3) load the same
    batches in the same order: the weights are bitwise those of loading in the training process."""
    base = scratch_config(tiny_sd, "train.caption_dropout=0.3", "train.tf32=true")
    workers = scratch_config(
        tiny_sd,
        "train.caption_dropout=0.3",
        "train.tf32=true",
        "train.data_workers=2",
        "train.pin_memory=true",
        "train.prefetch_factor=3",
    )
    plain, upstream = run_train(base, tmp_path / "plain", tiny_sd)
    loaded, _ = run_train(workers, tmp_path / "workers", tiny_sd)
    a, b = unet_weights(tmp_path / "plain", plain), unet_weights(tmp_path / "workers", loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert plain["info"]["final_loss"] == loaded["info"]["final_loss"]
    assert plain["info"]["tf32"] is False  # asked for, recorded as not applied: no CUDA here
    assert train_key(base, upstream) == train_key(workers, upstream)  # loading options: same key


@pytest.mark.skipif(
    not os.environ.get("SDFLOW_TEST_COMPILE"),
    reason="inductor builds the UNet's C++ kernels for ~5 minutes on a cold 2-core CPU; "
    "set SDFLOW_TEST_COMPILE=1 to run it",
)
def test_compiled_unet_trains_and_exports_like_the_eager_one(tmp_path, tiny_sd):
    """`train.compile` (inductor on the CPU) runs real steps: the first step's loss (same weights,
    same inputs) is the eager one's; names and weights stay exportable, two Adam steps of lr 1e-3
    (each moves a weight by at most about lr) apart at most."""
    eager, _ = run_train(scratch_config(tiny_sd, "train.max_steps=2"), tmp_path / "e", tiny_sd)
    config = scratch_config(tiny_sd, "train.max_steps=2", "train.compile=true")
    compiled, _ = run_train(config, tmp_path / "c", tiny_sd)
    a, b = unet_weights(tmp_path / "e", eager), unet_weights(tmp_path / "c", compiled)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=4e-3) for k in a)
    _, first = load_checkpoint(stage_path(tmp_path / "e", eager) / "checkpoints" / "step-000002")
    _, other = load_checkpoint(stage_path(tmp_path / "c", compiled) / "checkpoints" / "step-000002")
    losses = [v["progress"]["history"][0][1] for v in (first, other)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
