"""Model weights load from safetensors; pickled weights only with model.allow_pickle_weights
(sdflow.models.components.load_component)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from sdflow.config import ModelConfig
from sdflow.errors import UserError
from sdflow.models.components import load_component


def tiny_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )


@pytest.fixture(scope="module")
def pickled_vae(tmp_path_factory):
    root = tmp_path_factory.mktemp("pickled")
    tiny_vae(0).save_pretrained(root / "vae", safe_serialization=False)
    assert [p.suffix for p in (root / "vae").iterdir() if "model" in p.name] == [".bin"]
    return root


def config(root, allow: bool = False) -> ModelConfig:
    return ModelConfig(init="pretrained", pretrained=str(root), allow_pickle_weights=allow)


def test_pickle_only_weights_are_refused_before_any_read(pickled_vae, monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    with pytest.raises(UserError, match="model.allow_pickle_weights: true"):
        load_component(str(pickled_vae), "vae", AutoencoderKL, config(pickled_vae))


def test_pickle_weights_load_when_the_user_opts_in(pickled_vae):
    loaded = load_component(str(pickled_vae), "vae", AutoencoderKL, config(pickled_vae, True))
    reference = tiny_vae(0).state_dict()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.items())


def test_safetensors_win_over_a_pickle_beside_them(tmp_path):
    """A directory with both: the safetensors load, even with pickles allowed."""
    tiny_vae(1).save_pretrained(tmp_path / "vae", safe_serialization=False)  # the pickle
    tiny_vae(2).save_pretrained(tmp_path / "vae")  # the safetensors, other weights
    reference = load_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    for allow in (False, True):
        loaded = load_component(str(tmp_path), "vae", AutoencoderKL, config(tmp_path, allow))
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.items())


def test_the_key_is_in_the_config_and_off_by_default():
    assert ModelConfig().allow_pickle_weights is False
    with pytest.raises(ValueError, match="allow_pickle_weights"):
        ModelConfig(allow_pickle_weights="sometimes")
