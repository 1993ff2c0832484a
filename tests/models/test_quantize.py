"""`model.quantize` on the tiny Flux and SD3 transformers: torchao's int8 and float8 bases on this CPU carry
a LoRA whose output delta is the one the same adapter makes on the full-precision base, within the
error the format implies; what this host cannot run is refused before any work."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sdflow.errors import UserError
from sdflow.models.quantize import check_quantize
from sdflow.models.trainable import build_trainable_denoiser
from sdflow.profiles import ConfigError, load_profile

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TARGETS = "train.lora_targets=[to_q,to_k,to_v,to_out.0,add_q_proj,ff.net.2,proj_mlp,proj_out]"
# Worst-case relative error of one weight: int8 absmax per output channel rounds to half a step of
# max|row| / 127; float8 e4m3 keeps 3 mantissa bits (half an ulp: 2^-4). The quantized base
# computes in bfloat16 (8 bits: 2^-8), which diffusers imposes on a torchao base.
WEIGHT_ERROR = {"int8": 1 / 254, "fp8": 2**-4}
BF16_ERROR = 2**-8


def config(pipeline, quantize: str, *more: str):
    options = ["model.init=pretrained", f"model.pretrained={pipeline}", "train.mode=lora",
               f"model.quantize={quantize}", TARGETS, *more]  # fmt: skip
    return load_profile("tiny-test", options)


def inputs(family: str) -> dict:
    g = torch.Generator().manual_seed(2)
    if family == "sd3":  # the tiny SD3: 16 latent channels, T5 width 48, pooled 32
        return dict(
            hidden_states=torch.randn(2, 16, 8, 8, generator=g), timestep=torch.tensor([300.0, 800.0]),
            encoder_hidden_states=torch.randn(2, 10, 48, generator=g),
            pooled_projections=torch.randn(2, 32, generator=g), return_dict=False,
        )  # fmt: skip
    return dict(
        hidden_states=torch.randn(2, 16, 64, generator=g), timestep=torch.tensor([0.3, 0.8]),
        guidance=torch.ones(2), pooled_projections=torch.randn(2, 16, generator=g),
        encoder_hidden_states=torch.randn(2, 8, 32, generator=g), txt_ids=torch.zeros(8, 3),
        img_ids=torch.zeros(16, 3), return_dict=False,
    )  # fmt: skip


@torch.no_grad()
def base_and_delta(model, adapter: dict, quantized: bool, family: str) -> tuple[torch.Tensor, ...]:
    """The base's output and what the adapter adds to it, in the training precision (bf16
    autocast on the quantized base, float32 on the full one)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=quantized):
        model.disable_adapters()
        base = model(**inputs(family))[0].float()
        model.enable_adapters()
        model.load_state_dict(adapter, strict=False)
        return base, model(**inputs(family))[0].float() - base


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    ("family", "quantize"), [("flux", "int8"), ("flux", "fp8"), ("sd3", "int8")]
)
def test_an_adapter_on_a_quantized_base_adds_what_it_adds_on_the_full_base(
    request, family, quantize
):
    pipeline = request.getfixturevalue(f"tiny_{family}")
    sources = SimpleNamespace(unet=str(pipeline))
    full = build_trainable_denoiser(config(pipeline, quantize), sources, torch.float32)
    quant = build_trainable_denoiser(config(pipeline, quantize), sources, torch.bfloat16, True)
    assert type(full.transformer_blocks[0].attn.to_q.base_layer.weight) is torch.nn.Parameter
    assert type(quant.transformer_blocks[0].attn.to_q).__name__ == "TorchaoLoraLinear"
    g = torch.Generator().manual_seed(1)  # a trained-looking adapter (a fresh one's B is zero)
    adapter = {n: torch.randn(p.shape, generator=g) * 0.2
               for n, p in full.named_parameters() if p.requires_grad}  # fmt: skip
    full_base, full_delta = base_and_delta(full, adapter, False, family)
    quant_base, quant_delta = base_and_delta(quant, adapter, True, family)
    assert relative(quant_base, full_base) > BF16_ERROR / 4  # the base really is quantized
    assert full_delta.norm() > 0.3 * full_base.norm()  # a delta well above the noise
    tolerance = 2 * (WEIGHT_ERROR[quantize] + BF16_ERROR)  # both errors, through two blocks
    assert relative(quant_delta, full_delta) < tolerance
    if quantize == "int8":  # tight enough to see an adapter scaled 5% wrong (e.g. its alpha)
        assert relative(quant_delta * 1.05, full_delta) > tolerance


def test_what_cannot_run_is_refused_before_any_work(tiny_flux, tiny_sd15, monkeypatch):
    with pytest.raises(ConfigError, match="model.quantize is 'int8' but train.mode is 'full'"):
        config(tiny_flux, "int8", "train.mode=full")
    with pytest.raises(UserError, match=r"'nf4' .* needs a CUDA GPU.*pip install -e '.\[gpu\]'"):
        check_quantize(config(tiny_flux, "nf4"), cuda=False)
    with pytest.raises(UserError, match="model.quantize is 'int8' but the model is a 'sd'"):
        check_quantize(config(tiny_sd15, "int8"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    missing = r"torchao is not installed: pip install -e '.\[quantize\]'"
    with pytest.raises(UserError, match=missing):
        check_quantize(config(tiny_flux, "fp8"))
