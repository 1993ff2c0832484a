"""bfloat16 master weights (`train.master_weights`): stochastic rounding is unbiased between the two
bfloat16 neighbours, an update far below bfloat16's resolution still moves the weights (round to
nearest drops it), and a run continued from the optimizer's saved state rounds as an uninterrupted
one, bitwise."""

from __future__ import annotations

import pytest
import torch
from transformers.optimization import Adafactor

from sdflow.profiles import ConfigError, load_profile
from sdflow.training.master_weights import step_in_float32, stochastic_round


def test_stochastic_rounding_is_unbiased_between_the_two_neighbours():
    ulp = 2.0**-7  # bfloat16's spacing in [1, 2): 7 stored mantissa bits
    x = torch.full((200_000,), 1 + 0.3 * ulp)
    rounded = stochastic_round(x, torch.Generator().manual_seed(0)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1 + ulp}
    share_up = (rounded > 1).float().mean().item()
    assert abs(share_up - 0.3) < 4 * (0.3 * 0.7 / x.numel()) ** 0.5  # 4 sigma of a binomial
    assert x.to(torch.bfloat16).float().unique().tolist() == [1.0]  # round to nearest: never up


def model_and_optimizer(dtype: torch.dtype, rounding: bool):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 64).to(dtype)
    optimizer = Adafactor(model.parameters(), lr=1e-5, relative_step=False, scale_parameter=False,
                          warmup_init=False)  # fmt: skip
    if rounding:
        step_in_float32(optimizer, seed=3)
    return model, optimizer


def train(model, optimizer, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 64, generator=g).to(model.weight.dtype)
        model(x).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_small_updates_accumulate_and_a_resumed_run_rounds_identically():
    """lr 1e-5 moves a weight by ~1e-5, far below bf16's spacing (2^-8 of it): rounded to nearest,
    most updates vanish; rounded stochastically, the weights follow the float32 run's closely."""
    reference, optimizer = model_and_optimizer(torch.float32, False)
    start = reference.weight.detach().to(torch.bfloat16).float()
    train(reference, optimizer, range(40))
    nearest, optimizer = model_and_optimizer(torch.bfloat16, False)
    train(nearest, optimizer, range(40))
    model, optimizer = model_and_optimizer(torch.bfloat16, True)
    train(model, optimizer, range(40))
    assert model.weight.dtype == torch.bfloat16

    def share_moved(m) -> float:  # of the float32 run's movement, along its direction
        moved = reference.weight.detach() - start
        return ((m.weight.float() - start) * moved).sum().item() / moved.pow(2).sum().item()

    assert share_moved(nearest) < 0.1 < 0.4 < share_moved(model)  # measured: 0.006 and 0.58

    resumed, optimizer = model_and_optimizer(torch.bfloat16, True)
    train(resumed, optimizer, range(20))
    saved = ({k: v.clone() for k, v in resumed.state_dict().items()}, optimizer.state_dict())
    again, optimizer = model_and_optimizer(torch.bfloat16, True)
    again.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    train(again, optimizer, range(20, 40))
    assert torch.equal(again.weight, model.weight) and torch.equal(again.bias, model.bias)


@pytest.mark.parametrize(
    ("setting", "key"),
    [("train.mode=lora", "mode"), ("train.mixed_precision=no", "mixed_precision"),
     ("train.ema=true", "ema"), ("train.sharding=fsdp", "sharding")],
)  # fmt: skip
def test_bf16_master_weights_need_a_bf16_full_finetune_without_ema(setting, key):
    options = ["train.master_weights=bfloat16", "train.mixed_precision=bf16", "train.mode=full",
               "model.init=pretrained", "model.pretrained=x", setting]  # fmt: skip
    with pytest.raises(ConfigError, match=f"master_weights is 'bfloat16' but train.{key}"):
        load_profile("tiny-test", options)
