"""`train.optimizer`: Prodigy and Adafactor take the settings their authors recommend (each step
equals the library's optimizer built here with those settings written out), and their state goes
through a checkpoint so a resumed run continues bitwise."""

from __future__ import annotations

import pytest
import torch
from prodigyopt import Prodigy
from transformers.optimization import Adafactor

from sdflow.config import TrainConfig
from sdflow.errors import UserError
from sdflow.profiles import ConfigError, load_profile
from sdflow.store.checkpoints import load_latest, save_checkpoint
from sdflow.training import optimizers
from sdflow.training.optimizers import make_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))


def step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, i: int) -> None:
    generator = torch.Generator().manual_seed(i)
    x, y = torch.randn(4, 6, generator=generator), torch.randn(4, 3, generator=generator)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(net(x), y).backward()
    optimizer.step()


REFERENCES = {
    "prodigy": (
        dict(lr=1.0, warmup_steps=3, max_steps=10, lr_scheduler="constant_with_warmup"),
        lambda p: Prodigy(
            p, lr=1.0, betas=(0.9, 0.99), weight_decay=0.01, decouple=True,
            use_bias_correction=True, safeguard_warmup=True, d_coef=1.0,
        ),
    ),
    "adafactor": (
        dict(lr=1e-3),
        lambda p: Adafactor(
            p, lr=1e-3, relative_step=False, scale_parameter=False, warmup_init=False,
            weight_decay=0.01,
        ),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_steps_equal_the_library_optimizer_with_the_recommended_settings(name):
    settings, reference = REFERENCES[name]
    train = TrainConfig(optimizer=name, **settings)
    ours, theirs = model(), model()
    a, b = make_optimizer(train, list(ours.parameters())), reference(list(theirs.parameters()))
    for i in range(5):
        step(ours, a, i)
        step(theirs, b, i)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(ours[0].weight, model()[0].weight)  # it did train


@pytest.mark.parametrize("name", ["adamw", "prodigy", "adafactor"])
def test_a_checkpointed_optimizer_resumes_bitwise(name, tmp_path):
    train = TrainConfig(optimizer=name, lr=1.0 if name == "prodigy" else 1e-2)
    straight = model()
    optimizer = make_optimizer(train, list(straight.parameters()))
    for i in range(6):
        step(straight, optimizer, i)

    first = model()
    optimizer = make_optimizer(train, list(first.parameters()))
    for i in range(3):
        step(first, optimizer, i)
    state = {"model": dict(first.named_parameters()), "optimizer": optimizer.state_dict()}
    save_checkpoint(tmp_path, 3, state, keep=1)  # safetensors + JSON, as the train stage does
    _, values = load_latest(tmp_path)
    resumed = model()
    resumed.load_state_dict(values["model"])
    optimizer = make_optimizer(train, list(resumed.parameters()))
    optimizer.load_state_dict(values["optimizer"])
    for i in range(3, 6):
        step(resumed, optimizer, i)
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_prodigy_refuses_an_adamw_learning_rate():
    with pytest.raises(ConfigError, match=r"train.optimizer is 'prodigy' but train.lr is 0.0001"):
        load_profile("tiny-test", ["train.optimizer=prodigy", "train.lr=0.0001"])


def test_a_missing_package_is_named_before_any_work(monkeypatch):
    monkeypatch.setattr(optimizers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="prodigyopt is not installed: pip install prodigyopt"):
        optimizers.check_optimizer(TrainConfig(optimizer="prodigy", lr=1.0))
