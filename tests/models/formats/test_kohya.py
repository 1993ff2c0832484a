"""kohya-format LoRA exports read by diffusers' `load_lora_weights`, and adapter files read back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from fixtures.sd_layout import component_outputs, encoders_of, load_copy
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from sdflow.errors import UserError
from sdflow.models.families import get_family
from sdflow.models.formats.kohya import export_kohya, load_text_adapter, load_unet_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CASES = {"sd15": ("sd15_layout", StableDiffusionPipeline, "sd"),
         "sdxl": ("sdxl_layout", StableDiffusionXLPipeline, "sdxl")}  # fmt: skip
RANK, ALPHA = 2, 3.0  # alpha != rank: a mis-scaled load would show


def with_adapters(pipe) -> None:
    """Random non-zero adapters on the UNet (attention and proj_in) and every text encoder."""
    torch.manual_seed(0)
    config = dict(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian")
    pipe.unet.add_adapter(LoraConfig(**config, target_modules=["to_q", "to_k", "to_v",
                                                               "to_out.0", "proj_in"]))  # fmt: skip
    for encoder in encoders_of(pipe):
        text = LoraConfig(**config, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
        inject_adapter_in_model(text, encoder, adapter_name="default")
    with torch.no_grad():
        for module in [pipe.unet, *encoders_of(pipe)]:
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.normal_()


def save_both(pipe, family: str, root: Path) -> tuple[Path, Path]:
    """The adapters as sdflow's diffusers export writes them, and as kohya's format."""
    parts = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet),
             "unet_lora_adapter_metadata": pipe.unet.peft_config["default"].to_dict()}  # fmt: skip
    for name, encoder in zip(("text_encoder", "text_encoder_2"), encoders_of(pipe), strict=False):
        parts[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(encoder)
        )
        parts[f"{name}_lora_adapter_metadata"] = encoder.peft_config["default"].to_dict()
    type(pipe).save_lora_weights(root / "diffusers", safe_serialization=True, **parts)
    kohya = root / "kohya.safetensors"
    export_kohya(kohya, pipe.unet, encoders_of(pipe), get_family(family), "float32")
    return root / "diffusers", kohya


@pytest.fixture(scope="module")
def adapters(request, tmp_path_factory) -> dict:
    out = {}
    for case, (fixture, _, family) in CASES.items():
        folder = request.getfixturevalue(fixture)
        pipe = load_copy(folder)
        with_adapters(pipe)
        out[case] = (folder, *save_both(pipe, family, tmp_path_factory.mktemp(case)))
    return out


@pytest.mark.parametrize("case", CASES)
def test_load_lora_weights_on_the_kohya_file_equals_the_diffusers_lora(case, adapters):
    folder, diffusers_lora, kohya = adapters[case]
    keys = load_file(kohya)
    names = {k.split("_text_model")[0] for k in keys if k.startswith("lora_te")}
    assert names == ({"lora_te"} if case == "sd15" else {"lora_te1", "lora_te2"})
    alphas = {float(v) for k, v in keys.items() if k.endswith(".alpha")}
    assert alphas == {ALPHA}
    reference, kohya_pipe, base = load_copy(folder), load_copy(folder), load_copy(folder)
    reference.load_lora_weights(diffusers_lora)
    kohya_pipe.load_lora_weights(str(kohya))
    expected, got, plain = (
        component_outputs(reference, with_vae=False),
        component_outputs(kohya_pipe, with_vae=False),
        component_outputs(base, with_vae=False),
    )
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
        assert not torch.allclose(plain[name], value), name  # the adapter does change it


@pytest.mark.parametrize(("fmt", "case"), [("diffusers", "sd15"), ("kohya", "sdxl")])
def test_an_adapter_file_read_back_reproduces_its_outputs(fmt, case, adapters):
    """`train.init_lora` at 0 steps: the base with the file's adapters is what load_lora_weights
    gives, rank and alpha read from the file."""
    folder, diffusers_lora, kohya = adapters[case]
    cls = CASES[case][1]
    path = kohya if fmt == "kohya" else diffusers_lora / "pytorch_lora_weights.safetensors"
    reference, ours = load_copy(folder), load_copy(folder)
    reference.load_lora_weights(str(path))
    load_unet_adapter(path, cls, ours.unet, text_trained=True)
    for index, encoder in enumerate(encoders_of(ours)):
        assert load_text_adapter(path, cls, encoder, index)
    config = ours.unet.peft_config["default"]
    assert (config.r, config.lora_alpha) == (RANK, ALPHA)
    trained = {n for n, p in ours.unet.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    expected, got = (
        component_outputs(reference, with_vae=False),
        component_outputs(ours, with_vae=False),
    )
    for name, value in expected.items():
        assert torch.allclose(got[name], value, atol=1e-6), name


def test_a_lora_of_another_base_is_refused(adapters, sd15_layout):
    _, _, kohya = adapters["sdxl"]
    unet = load_copy(sd15_layout).unet
    with pytest.raises(
        UserError, match=r"kohya.safetensors does not fit the base model: its unet adapter"
    ):
        load_unet_adapter(kohya, StableDiffusionPipeline, unet, text_trained=True)
    with pytest.raises(UserError, match=r"also adapts the text encoder.*text_encoder: lora"):
        load_unet_adapter(kohya, StableDiffusionXLPipeline, unet, text_trained=False)
