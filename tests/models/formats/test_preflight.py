"""`train.init_lora` checked against the base before any work: key names and shapes only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from sdflow.errors import UserError
from sdflow.models.families import get_family
from sdflow.models.formats.kohya import export_kohya
from sdflow.models.formats.preflight import check_model_files, header_state
from sdflow.profiles import load_profile

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def unet_lora(base: Path, family: str, out: Path) -> Path:
    """A kohya-format LoRA of `base`'s UNet (attention and proj_in), as sdflow exports it."""
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]
    unet.add_adapter(LoraConfig(r=2, lora_alpha=3.0, target_modules=targets))
    export_kohya(out, unet, [], get_family(family), "float32")
    return out


def lora_run(base: Path, lora: Path, *overrides: str):
    options = ["model.init=pretrained", f"model.pretrained={base}", "train.mode=lora",
               f"train.init_lora={lora}", *overrides]  # fmt: skip
    return load_profile("tiny-test", options)


@pytest.fixture(scope="module")
def loras(sd15_layout, sdxl_layout, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "sd": unet_lora(sd15_layout, "sd", root / "sd.safetensors"),
        "sdxl": unet_lora(sdxl_layout, "sdxl", root / "sdxl.safetensors"),
    }


def test_a_lora_of_the_base_passes_and_one_of_another_family_names_what_does_not_fit(
    loras, sd15_layout, sdxl_layout
):
    check_model_files(lora_run(sd15_layout, loras["sd"]))
    check_model_files(lora_run(sdxl_layout, loras["sdxl"]))
    # SDXL's proj_in is a Linear of 16 outputs; SD 1.x's (this layout) a 1x1 conv of 8
    with pytest.raises(UserError) as error:
        check_model_files(lora_run(sd15_layout, loras["sdxl"]))
    message = str(error.value)
    assert f"train.init_lora {loras['sdxl']} does not fit the base model {sd15_layout}" in message
    assert "(a 'sd' model): its unet adapter names" in message
    assert "'down_blocks.1.attentions.0.proj_in' (16 outputs in the file, 8 in the base)" in message
    assert "set model.pretrained to the base it was trained on" in message
    with pytest.raises(UserError, match=r"'down_blocks.0.attentions.0.proj_in' \(no such module"):
        check_model_files(lora_run(sdxl_layout, loras["sd"]))  # SDXL's first level has none
    check_model_files(lora_run(sd15_layout, loras["sdxl"]), only=["download"])  # no train: no check


def test_the_header_gives_the_shapes_without_the_weights(loras):
    from safetensors.torch import load_file

    state, real = header_state(loras["sd"]), load_file(loras["sd"])
    assert state.keys() == real.keys()
    for key, tensor in real.items():
        assert state[key].shape == tensor.shape
        if key.endswith(".alpha"):
            assert torch.equal(state[key], tensor)
        else:
            assert state[key].device.type == "meta"
