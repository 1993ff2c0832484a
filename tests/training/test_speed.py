"""Speed options of the train stage (`sdflow.training.speed`), each checked on the CPU against the default
path it must agree with: channels-last memory format, the attention processors, fused AdamW, TF32
(a no-op without CUDA) and the errors of options this host cannot run; and batched latent reads."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from fixtures.training import ROWS, batch_of, sd_scheduler
from pydantic import ValidationError

from sdflow.config import TrainConfig
from sdflow.errors import UserError
from sdflow.models.components import build_unet
from sdflow.profiles import load_profile
from sdflow.training import speed
from sdflow.training.objective import diffusion_loss
from sdflow.training.optimizers import make_optimizer
from sdflow.training.speed import apply_tf32, check_speed_options, fused_adamw, prepare_unet

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


def tiny_unet() -> torch.nn.Module:
    model = load_profile("tiny-test").model
    return build_unet(model)


def loss_and_grads(unet, ramp_source, train: TrainConfig) -> tuple[float, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batch = batch_of(ramp_source, list(range(8)))
    loss = diffusion_loss(unet, sd_scheduler(), ramp_source, batch, generator, train, CPU)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in unet.parameters()]


def test_channels_last_keeps_the_loss_and_the_gradients(ramp_source):
    plain, last = TrainConfig(), TrainConfig(channels_last=True)
    reference = tiny_unet()
    unet = prepare_unet(tiny_unet(), last)
    conv = unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    loss_a, grads_a = loss_and_grads(reference, ramp_source, plain)
    loss_b, grads_b = loss_and_grads(unet, ramp_source, last)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_sdpa_and_eager_attention_give_the_same_output():
    sdpa = prepare_unet(tiny_unet(), TrainConfig(attention="sdpa"))
    eager = prepare_unet(tiny_unet(), TrainConfig(attention="eager"))
    assert {type(p) for p in sdpa.attn_processors.values()} == {AttnProcessor2_0}
    assert {type(p) for p in eager.attn_processors.values()} == {AttnProcessor}
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 16, 32, generator=generator)
    with torch.no_grad():
        a = sdpa(sample, torch.tensor([10, 500]), text).sample
        b = eager(sample, torch.tensor([10, 500]), text).sample
    assert not torch.equal(a, torch.zeros_like(a))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_adamw_is_the_default_on_this_cpu_and_matches_foreach_adamw(ramp_source):
    results = []
    for setting in (False, None):  # foreach, then unset: fused where torch has the kernel
        train = TrainConfig(fused_adamw=setting, lr=1e-3)
        check_speed_options(train, CPU)
        unet = tiny_unet()
        optimizer = make_optimizer(train, list(unet.parameters()), fused_adamw(train, CPU))
        assert optimizer.defaults["fused"] is (None if setting is False else True)
        assert optimizer.defaults["foreach"] is (True if setting is False else None)
        for _ in range(3):
            loss_and_grads(unet, ramp_source, train)
            optimizer.step()
            optimizer.zero_grad()
        results.append([p.detach().clone() for p in unet.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    start = tiny_unet().parameters()
    assert not all(torch.equal(a, p) for a, p in zip(results[0], start, strict=True))


def test_fused_adamw_is_refused_or_skipped_where_torch_has_no_kernel(monkeypatch):
    monkeypatch.setattr(speed, "_get_fused_kernels_supported_devices", lambda: ["cuda"])
    with pytest.raises(UserError, match=r"train.fused_adamw .* no fused AdamW for 'cpu'"):
        check_speed_options(TrainConfig(fused_adamw=True), CPU)
    check_speed_options(TrainConfig(), CPU)  # unset: foreach instead, no error
    assert fused_adamw(TrainConfig(), CPU) is False
    assert fused_adamw(TrainConfig(), torch.device("cuda")) is True


def test_compile_is_refused_on_a_cpu_without_a_compiler(monkeypatch):
    monkeypatch.setattr(speed.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="train.compile is true .* C\\+\\+ compiler"):
        check_speed_options(TrainConfig(compile=True), CPU)


def test_tf32_is_a_no_op_on_the_cpu():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    assert apply_tf32(TrainConfig(tf32=True), CPU) is False
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"prefetch_factor": 4}, "train.prefetch_factor is 4 but train.data_workers is 0"),
        ({"fused_adamw": True, "optimizer": "adamw8bit"}, "fused_adamw is true but train.optim"),
        ({"attention": "flash"}, "attention"),
        ({"fused_adamw": True, "mixed_precision": "fp16"}, "fused_adamw is true but train.mixed"),
    ],
)
def test_bad_speed_settings_fail_validation(values, message):
    with pytest.raises(ValidationError, match=message):
        TrainConfig(**values)


def test_cached_rows_read_through_kept_slices_match_the_file(ramp_source):
    dataset = ramp_source.dataset
    rows = [dataset[i] for i in (3, 0, ROWS - 1, 3)]
    assert len(dataset._open) == 1  # one shard opened once, its slices kept
    for index, row in zip((3, 0, ROWS - 1, 3), rows, strict=True):
        assert row["id"] == f"r{index}"
        assert torch.equal(row["mean"], torch.full((4, 8, 8), float(index)))  # the fixture's values
        assert torch.equal(row["mean_flip"], torch.full((4, 8, 8), -float(index)))
        assert row["input_ids"] is None
