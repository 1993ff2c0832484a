"""Train-stage exports for the tools people generate with (single file, kohya LoRA, model card),
and runs that start from a single-file base or an existing LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from fixtures.sd_layout import layout_latents
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from sdflow.models.families import TextEncoders, get_family
from sdflow.models.formats.single_file import export_single_file
from sdflow.models.formats.single_file_base import resolve_single_file_base
from sdflow.profiles import load_profile
from tasks.train import train, train_key

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = ["model.init=pretrained", "train.max_steps=1", "train.checkpoint_every=1",
         "train.batch_size=2", "train.log_every=1", "train.export_dtype=float32"]  # fmt: skip


def run(workdir: Path, base: Path, *overrides: str, single_file_config: Path | None = None):
    options = [*SMALL, f"model.pretrained={base}", *overrides]
    if single_file_config:
        options.append(f"model.config={single_file_config}")
    config = load_profile("tiny-test", options)
    config = resolve_single_file_base(config, str(workdir)) if single_file_config else config
    latents = layout_latents(workdir, Path(config.model.pretrained))
    manifest = train(config, {"latents": latents, "autoencoder": None}, str(workdir))
    return workdir / manifest["path"], manifest, config


def test_a_single_file_base_trains_and_exports_exactly_as_its_folder(sd15_layout, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(sd15_layout, safety_checker=None)
    text = TextEncoders([pipe.tokenizer], [pipe.text_encoder])
    layout = get_family("sd").single_file_layout(text)
    parts = (pipe.unet, pipe.vae, [pipe.text_encoder])
    export_single_file(tmp_path / "base.safetensors", layout, parts, "float32", "epsilon", "b")
    formats = "train.export_formats=[single_file]"
    folder_out, manifest, _ = run(tmp_path / "a", sd15_layout, formats)
    file_out, _, _ = run(tmp_path / "b", tmp_path / "base.safetensors", formats,
                         single_file_config=sd15_layout)  # fmt: skip
    files = manifest["files"]
    assert files["single_file"] == "pipeline.safetensors"
    one = UNet2DConditionModel.from_pretrained(folder_out / "pipeline" / "unet").state_dict()
    two = UNet2DConditionModel.from_pretrained(file_out / "pipeline" / "unet").state_dict()
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not torch.equal(one["conv_in.weight"], pipe.unet.state_dict()["conv_in.weight"])
    # the same weights: the same bytes, whichever workdir and base form they came from
    single = (folder_out / "pipeline.safetensors").read_bytes()
    assert single == (file_out / "pipeline.safetensors").read_bytes()
    card = ModelCard.load(folder_out / "pipeline" / "README.md")
    assert card.data.pipeline_tag == "text-to-image" and card.data.library_name == "diffusers"
    assert {"stable-diffusion", "text-to-image"} <= set(card.data.tags)
    assert "pipeline.safetensors" in card.text and "| steps | 1 |" in card.text


def test_a_lora_run_exports_kohya_and_a_later_run_continues_from_it(sd15_layout, tmp_path):
    lora = ["train.mode=lora", "train.lora_rank=4", "train.lora_alpha=8"]
    first, manifest, _ = run(tmp_path / "a", sd15_layout, *lora, "train.export_formats=[kohya]")
    kohya = first / manifest["files"]["kohya_lora"]
    assert kohya.name == "lora-kohya.safetensors"
    assert ModelCard.load(first / "lora" / "README.md").data.tags[-1] == "lora"
    # a run from the kohya file, with another rank in its config (the file's wins) and an lr so
    # small that a step barely moves it: its adapter is the first run's
    later = ["train.mode=lora", "train.lora_rank=2", "train.lr=1e-9", f"train.init_lora={kohya}"]
    second, _, config = run(tmp_path / "b", sd15_layout, *later)
    weights = "lora/pytorch_lora_weights.safetensors"
    before, after = load_file(first / weights), load_file(second / weights)
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    assert not all(torch.equal(before[k], after[k]) for k in before)  # it did train
    metadata = json.loads(_metadata(second / weights)["lora_adapter_metadata"])
    assert (metadata["unet.r"], metadata["unet.lora_alpha"]) == (4, 8)
    # the adapter's content is in the key: another file at the same path is another run
    key = train_key(config, {"latents": None, "autoencoder": None})
    kohya.write_bytes(kohya.read_bytes()[:-4] + b"\0\0\0\0")
    assert train_key(config, {"latents": None, "autoencoder": None}) != key


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.metadata()
