"""Single-file exports read by diffusers' own `from_single_file`, and single files read back in."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
from fixtures.sd_layout import component_outputs, encoders_of, load_copy
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdflow.errors import UserError
from sdflow.models.families import TextEncoders, get_family
from sdflow.models.formats.single_file import V_PRED_KEY, export_single_file
from sdflow.models.formats.single_file_base import (
    checkpoint_keys,
    detect_family,
    resolve_single_file_base,
)
from sdflow.profiles import load_profile

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CASES = {"sd15": ("sd15_layout", StableDiffusionPipeline, "sd"),
         "sd21": ("sd21_layout", StableDiffusionPipeline, "sd"),
         "sdxl": ("sdxl_layout", StableDiffusionXLPipeline, "sdxl")}  # fmt: skip


def export(pipe, family: str, path: Path, dtype: str = "float32") -> list[str]:
    encoders = encoders_of(pipe)
    layout = get_family(family).single_file_layout(TextEncoders([pipe.tokenizer], encoders))
    prediction = pipe.scheduler.config.prediction_type
    return export_single_file(path, layout, (pipe.unet, pipe.vae, encoders), dtype, prediction, "t")


@pytest.mark.parametrize("case", CASES)
def test_from_single_file_gives_the_diffusers_exports_outputs(case, request, tmp_path):
    fixture, cls, family = CASES[case]
    folder = request.getfixturevalue(fixture)
    pipe = load_copy(folder)
    written = export(pipe, family, tmp_path / "model.safetensors")
    kwargs = {"safety_checker": None} if cls is StableDiffusionPipeline else {}
    back = cls.from_single_file(
        str(tmp_path / "model.safetensors"), config=str(folder), local_files_only=True, **kwargs
    )
    expected, got = component_outputs(pipe), component_outputs(back)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        metadata, keys = handle.metadata(), set(handle.keys())
    v = case == "sd21"
    assert metadata["modelspec.prediction_type"] == ("v" if v else "epsilon")
    assert (V_PRED_KEY in keys) == v
    assert written == ["model.safetensors"] + (["model.yaml"] if v else [])


def test_the_v_prediction_yaml_describes_the_unet_as_diffusers_reads_it(sd21_layout, tmp_path):
    pipe = load_copy(sd21_layout)
    export(pipe, "sd", tmp_path / "model.safetensors")
    original = yaml.safe_load((tmp_path / "model.yaml").read_text())
    checkpoint = load_file(tmp_path / "model.safetensors")
    config = create_unet_diffusers_config_from_ldm(original, checkpoint)
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim",
                "down_block_types", "up_block_types", "use_linear_projection",
                "attention_head_dim"):  # fmt: skip
        assert (
            list(config[key]) == list(pipe.unet.config[key])
            if isinstance(config[key], (list, tuple))
            else config[key] == pipe.unet.config[key]
        ), key
    assert original["model"]["params"]["parameterization"] == "v"


def test_fp16_export_holds_the_weights_in_half_precision(sd15_layout, tmp_path):
    pipe = load_copy(sd15_layout)
    export(pipe, "sd", tmp_path / "half.safetensors", "float16")
    tensors = load_file(tmp_path / "half.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    weight = pipe.unet.conv_in.weight.detach().half()
    assert torch.equal(tensors["model.diffusion_model.input_blocks.0.0.weight"], weight)


def test_the_same_weights_write_the_same_bytes(sd15_layout, tmp_path):
    pipe = load_copy(sd15_layout)
    export(pipe, "sd", tmp_path / "a.safetensors")
    export(pipe, "sd", tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


# --------------------------------------------------------------------------------- inputs


def test_a_config_folder_of_another_family_is_refused(sd15_layout, sdxl_layout, tmp_path):
    export(load_copy(sd15_layout), "sd", tmp_path / "sd.safetensors")
    config = load_profile("tiny-test", ["model.init=pretrained",
                                        f"model.pretrained={tmp_path / 'sd.safetensors'}",
                                        f"model.config={sdxl_layout}"])  # fmt: skip
    with pytest.raises(UserError, match=r"is a 'sd' checkpoint but model.config .* 'sdxl'"):
        resolve_single_file_base(config, str(tmp_path / "work"))
    assert not (tmp_path / "work").exists()


def test_keys_of_no_known_family_are_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"transformer.blocks.0.weight": torch.zeros(2)}, str(path))
    with pytest.raises(UserError, match=r"other.safetensors.*match no model family.*transformer"):
        detect_family(path, checkpoint_keys(path))


class Payload:  # a pickled object: loading it would run code
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_ckpt_that_needs_pickle_is_refused_and_a_plain_one_is_read(tmp_path):
    evil, plain = tmp_path / "evil.ckpt", tmp_path / "plain.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": {"a": Payload()}}))
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, plain)
    with pytest.raises(UserError, match=r"evil.ckpt cannot be read without unpickling code"):
        checkpoint_keys(evil)
    assert checkpoint_keys(plain) == ["model.diffusion_model.x"]
