"""The training loop on hand-made latents (`sdflow.training.loop`): bf16 autocast on the CPU,
gradient checkpointing, and the TensorBoard scalars."""

from __future__ import annotations

import pytest
import torch
from accelerate.state import AcceleratorState
from fixtures.training import all_rows, sd_scheduler
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sdflow.config import TrainConfig
from sdflow.models.components import build_unet, component_sources
from sdflow.models.trainable import build_trainable_denoiser
from sdflow.profiles import load_profile
from sdflow.training.loop import make_accelerator, train_unet
from sdflow.training.objective import diffusion_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -------------------------------------------------------------------------- precision, memory


@pytest.fixture()
def bf16_accelerator(tmp_path):
    accelerator = make_accelerator(TrainConfig(mixed_precision="bf16"), tmp_path)
    yield accelerator
    accelerator.end_training()
    AcceleratorState._reset_state()


def conv_dtypes(unet: torch.nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    unet.down_blocks[0].resnets[0].conv1.register_forward_hook(
        lambda module, args, out: seen.append(out.dtype)
    )
    return seen


def test_bf16_mixed_precision_runs_the_unet_in_bf16_on_cpu(ramp_source, bf16_accelerator):
    model = load_profile("tiny-test").model
    train = TrainConfig(mixed_precision="bf16")
    batch, scheduler = all_rows(ramp_source), sd_scheduler()
    reference = build_unet(model)
    reference_dtypes = conv_dtypes(reference)
    expected = diffusion_loss(
        reference, scheduler, ramp_source, batch, torch.Generator().manual_seed(5), train, "cpu"
    )
    unet = bf16_accelerator.prepare(build_unet(model))
    dtypes = conv_dtypes(unet)
    loss = diffusion_loss(
        unet, scheduler, ramp_source, batch, torch.Generator().manual_seed(5), train, "cpu"
    )
    assert reference_dtypes == [torch.float32] and dtypes == [torch.bfloat16]
    assert loss.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=0.03)
    assert float(loss.detach()) != float(expected.detach())  # computed at another precision


def test_gradient_checkpointing_recomputes_blocks_and_keeps_the_loss(tmp_path, ramp_source):
    losses, grads, calls = [], [], []
    for enabled in (False, True):
        config = load_profile(
            "tiny-test",
            [f"model.vae={tmp_path}", f"train.gradient_checkpointing={str(enabled).lower()}"],
        )
        sources = component_sources(config, {}, str(tmp_path))
        unet = build_trainable_denoiser(config, sources).train()
        assert unet.is_gradient_checkpointing == enabled
        count: list[int] = []
        conv = unet.down_blocks[0].resnets[0].conv1
        conv.register_forward_hook(lambda *_, count=count: count.append(1))
        loss = diffusion_loss(
            unet,
            sd_scheduler(),
            ramp_source,
            all_rows(ramp_source),
            torch.Generator().manual_seed(6),
            config.train,
            "cpu",
        )
        loss.backward()
        losses.append(float(loss))
        grads.append(unet.conv_in.weight.grad.clone())
        calls.append(len(count))
    assert calls == [1, 2]  # checkpointing runs the block again during backward
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


# -------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_holds_the_logged_loss_and_lr(tmp_path, ramp_latents):
    workdir, manifest = ramp_latents
    overrides = [
        f"model.vae={tmp_path}",
        "train.max_steps=5",
        "train.log_every=2",
        "train.checkpoint_every=5",
        "train.batch_size=4",
        "train.lr=0.002",
    ]
    config = load_profile("tiny-test", overrides)
    upstream = {"latents": manifest, "autoencoder": None}
    summary = train_unet(config, upstream, str(workdir), tmp_path / "out")
    # the run's scalars; a sub-directory holds the hyper-parameters
    (events,) = (tmp_path / "out" / "logs" / "train").glob("events.out.tfevents.*")
    scalars = EventAccumulator(str(events)).Reload()
    loss = [(e.step, e.value) for e in scalars.Scalars("loss")]
    lr = [(e.step, e.value) for e in scalars.Scalars("lr")]
    logged = [h for h in summary.history if h[0] in (2, 4, 5)]  # every 2nd step and the last
    assert [s for s, _ in loss] == [2, 4, 5] and [s for s, _ in lr] == [2, 4, 5]
    assert [v for _, v in loss] == pytest.approx([h[1] for h in logged], rel=1e-6)
    assert [v for _, v in lr] == pytest.approx([0.002] * 3, rel=1e-6)
    assert len({round(v, 6) for _, v in loss}) == 3  # real per-step losses, not one constant
