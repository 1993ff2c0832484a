"""`train.lora_type`: each adapter's layer equals its formula recomputed here from its own weights,
and each export loads back, with a loader nobody here wrote (diffusers' `load_lora_weights` for
LoRA and DoRA, PEFT's `PeftModel` for LoKr and LoHa), to the module that was trained."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from peft import PeftModel

from sdflow.config import TrainConfig
from sdflow.models.adapters import PEFT_CONFIG, load_adapters
from sdflow.models.components import build_text_encoder, build_unet, build_vae
from sdflow.models.trainable import add_lora
from sdflow.profiles import ConfigError, load_profile
from tasks.train import _save_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def config_for(lora_type: str):
    """tiny-test's components and family with a LoRA section (unvalidated against model.init:
    these tests adapt the tiny UNet directly, no pretrained base on disk)."""
    train = TrainConfig(mode="lora", lora_type=lora_type, lora_rank=4, lora_alpha=8)
    return load_profile("tiny-test").model_copy(update={"train": train})


def adapted_unet(config):
    """The tiny UNet with the adapter added and its weights moved off their init (LoKr's and
    LoHa's init is a zero delta, LoRA's B too): the adapter must change the output."""
    unet = build_unet(config.model)
    add_lora(unet, config.train)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for param in unet.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.2)
    return unet.eval()


def unet_output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 5, 32, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 500]), encoder_hidden_states=text).sample


def test_each_adapter_layer_is_its_formula():
    """The adapted `to_q` of the first attention block against W x + delta(W) x recomputed from the
    adapter's own tensors: LoRA s·B·A, DoRA m·(W + s·B·A)/‖W + s·B·A‖ (row norms), LoKr
    s·(w1 ⊗ w2), LoHa s·(w1a·w1b) ⊙ (w2a·w2b), with s = alpha / rank."""
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    for lora_type in ("lora", "dora", "lokr", "loha"):
        config = config_for(lora_type)
        unet = adapted_unet(config)
        layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
        weights = {n: p.detach() for n, p in layer.named_parameters() if "default" in n}
        base = layer.base_layer.weight.detach()
        scale = 8 / config.train.lora_rank
        w = {n.split(".")[0]: v for n, v in weights.items()}
        if lora_type in ("lora", "dora"):
            merged = base + scale * w["lora_B"] @ w["lora_A"]
            if lora_type == "dora":
                norm = merged.norm(dim=1, keepdim=True)
                merged = w["lora_magnitude_vector"][:, None] * merged / norm
        elif lora_type == "lokr":
            merged = base + scale * torch.kron(w["lokr_w1"], w["lokr_w2"])
        else:
            left = w["hada_w1_a"] @ w["hada_w1_b"]
            merged = base + scale * left * (w["hada_w2_a"] @ w["hada_w2_b"])
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ merged.T, atol=1e-5, rtol=1e-4)


def fresh_pipeline(config) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=build_vae(config.model),
        text_encoder=build_text_encoder(config.model, 640),
        tokenizer=None,
        unet=build_unet(config.model),
        scheduler=DDPMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.mark.parametrize("lora_type", ["lora", "dora"])
def test_lora_and_dora_exports_load_with_load_lora_weights(lora_type, tmp_path):
    config = config_for(lora_type)
    unet = adapted_unet(config)
    _save_lora(config, unet, tmp_path / "lora")
    pipe = fresh_pipeline(config)
    base = unet_output(pipe.unet)
    pipe.load_lora_weights(str(tmp_path / "lora"))  # diffusers' own loader
    loaded = unet_output(pipe.unet.eval())
    torch.testing.assert_close(loaded, unet_output(unet), atol=1e-5, rtol=1e-4)
    assert (loaded - base).abs().mean() > 1e-3  # the adapter really acts
    has_magnitude = any("lora_magnitude_vector" in n for n, _ in pipe.unet.named_parameters())
    assert has_magnitude == (lora_type == "dora")  # DoRA comes back as DoRA


@pytest.mark.parametrize("lora_type", ["lokr", "loha"])
def test_lokr_and_loha_exports_load_with_peft(lora_type, tmp_path):
    config = config_for(lora_type)
    unet = adapted_unet(config)
    _save_lora(config, unet, tmp_path / "lora")
    assert (tmp_path / "lora" / "unet" / PEFT_CONFIG).is_file()
    fresh = build_unet(config.model)
    base = unet_output(fresh)
    peft_unet = PeftModel.from_pretrained(fresh, str(tmp_path / "lora" / "unet")).eval()
    loaded = unet_output(peft_unet)
    torch.testing.assert_close(loaded, unet_output(unet), atol=1e-5, rtol=1e-4)
    assert (loaded - base).abs().mean() > 1e-3
    # and the evaluate stage's loader puts the same adapter onto a pipeline
    pipe = load_adapters(fresh_pipeline(config), tmp_path / "lora")
    torch.testing.assert_close(unet_output(pipe.unet.eval()), loaded, atol=1e-5, rtol=1e-4)


def test_adapter_types_are_for_lora_runs():
    with pytest.raises(ConfigError, match="train.lora_type is 'dora' but train.mode is 'full'"):
        load_profile("tiny-test", ["train.lora_type=dora"])
    with pytest.raises(ConfigError, match=r"train.lora_type.*'lora', 'dora', 'lokr' or 'loha'"):
        load_profile("tiny-test", ["train.lora_type=ia3"])
    with pytest.raises(ConfigError, match="train.export_formats has 'kohya' but train.lora_type"):
        load_profile(
            "tiny-test", ["train.mode=lora", "train.lora_type=lokr", "train.export_formats=[kohya]"]
        )
