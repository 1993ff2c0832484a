"""Model files that do not fit stop the pipeline flow before its first stage, and nothing of an
earlier output is lost: a LoRA of another family, a single file of no known family, a config
folder of another family than the single file's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from safetensors.torch import save_file

from flows.pipeline import pipeline
from sdflow.errors import UserError
from sdflow.models.families import get_family
from sdflow.models.formats.kohya import export_kohya

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SDXL_KEYS = ["model.diffusion_model.input_blocks.0.0.weight",
             "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"]  # fmt: skip


def sdxl_lora(sdxl_layout: Path, out: Path) -> Path:
    unet = UNet2DConditionModel.from_pretrained(sdxl_layout / "unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2.0, target_modules=["to_q", "to_k", "proj_in"]))
    export_kohya(out, unet, [], get_family("sdxl"), "float32")
    return out


def weights(path: Path, keys: list[str]) -> Path:
    save_file({key: torch.zeros(2) for key in keys}, str(path))
    return path


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", ["sdxl_lora_on_sd", "unknown_single_file", "config_of_sd"])
def test_a_file_that_does_not_fit_stops_the_flow_before_the_download_stage(
    case, sd15_layout, sdxl_layout, tmp_path
):
    base = ["model.init=pretrained", f"model.pretrained={sd15_layout}"]
    if case == "sdxl_lora_on_sd":
        lora = sdxl_lora(sdxl_layout, tmp_path / "style.safetensors")
        overrides = [*base, "train.mode=lora", f"train.init_lora={lora}"]
        expected = rf"{lora} does not fit the base model {sd15_layout} \(a 'sd' model\)"
    else:
        keys = ["weird.block.weight", "other.bias"] if case == "unknown_single_file" else SDXL_KEYS
        single = weights(tmp_path / "merge.safetensors", keys)
        overrides = ["model.init=pretrained", f"model.pretrained={single}",
                     f"model.config={sd15_layout}"]  # fmt: skip
        expected = (
            r"merge.safetensors: its keys match no model family .*\['other.bias', 'weird.block"
            if case == "unknown_single_file"
            else rf"merge.safetensors is a 'sdxl' checkpoint but model.config {sd15_layout}"
        )
    workdir = tmp_path / "work"
    earlier = workdir / "stages" / "train" / "earlier"  # an earlier run's output stays as it was
    earlier.mkdir(parents=True)
    (earlier / "MANIFEST.json").write_text('{"stage": "train"}')
    before = tree(workdir)
    with pytest.raises(UserError, match=expected):
        pipeline.fn("tiny-test", overrides, str(workdir))
    assert tree(workdir) == before
    assert sorted(p.name for p in workdir.iterdir()) == ["stages"]
    assert [p.name for p in (workdir / "stages").iterdir()] == ["train"]
