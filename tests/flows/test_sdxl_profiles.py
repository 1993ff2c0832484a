"""The SDXL profiles end to end through `sdflow run`, with the tiny SDXL pipeline swapped in.

Each profile runs with its own settings; only the sizes, paths and step counts are overridden (and
fp16 training, which a CPU cannot run, becomes fp32). The output is reloaded with diffusers and
generates.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from sdflow.cli import main
from sdflow.profiles import load_profile

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    from sdflow.sources.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("sdxl-demo") / "data", count=16, seed=0)


def sized_down(folder: Path, pipeline: Path) -> list[str]:
    """Sizes, paths and steps only: every other setting is the profile's."""
    return [
        "source.kind=folder", f"source.path={folder}", f"model.pretrained={pipeline}",
        "download.resolution=32", "filter.min_size=16", "latents.batch_size=8",
        "train.max_steps=2", "train.checkpoint_every=2", "train.warmup_steps=1",
        "train.batch_size=2", "train.gradient_accumulation=2", "eval.held_out_fraction=0.25",
        "eval.num_prompts=2", "eval.num_inference_steps=2", "eval.fid_features=random-cnn",
        "eval.fid_samples=4", "eval.clip_model=null", "eval.batch_size=4",
    ]  # fmt: skip


def run_profile(profile: str, workdir: Path, overrides: list[str]) -> dict:
    args = ["run", profile, "--workdir", str(workdir)]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    (run_dir,) = (workdir / "runs").glob("*")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary["stages"]
    assert summary["metrics"]["trained"]["fid"] is not None
    return summary


def generate(pipe: StableDiffusionXLPipeline):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe("a red circle", height=32, width=32, num_inference_steps=2,
                generator=generator, output_type="np").images[0]  # fmt: skip


def test_sdxl_lora_24gb(prefect_server, small_folder, tiny_sdxl, tmp_path):
    profile = load_profile("sdxl-lora-24gb")
    assert (profile.train.mode, profile.train.gradient_checkpointing) == ("lora", True)
    assert profile.download.resize_mode == "max_area" and profile.latents.buckets.resolution == 1024
    vae = f"model.vae={tiny_sdxl / 'vae'}"  # stands in for the fp16-safe VAE
    buckets = "latents.buckets={resolution: 32, step: 16}"
    fp32 = "train.mixed_precision=no"  # fp16 autocast training needs a GPU
    summary = run_profile(
        "sdxl-lora-24gb", tmp_path, [*sized_down(small_folder, tiny_sdxl), vae, fp32, buckets]
    )
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_lora_weights(summary["model_dir"])
    assert generate(pipe).shape == (32, 32, 3)


def test_sdxl_finetune_80gb(prefect_server, small_folder, tiny_sdxl, tmp_path):
    profile = load_profile("sdxl-finetune-80gb")
    assert (profile.train.mode, profile.train.ema, profile.train.mixed_precision) == (
        "full", True, "bf16")  # fmt: skip
    summary = run_profile("sdxl-finetune-80gb", tmp_path, sized_down(small_folder, tiny_sdxl))
    pipe = StableDiffusionXLPipeline.from_pretrained(summary["model_dir"])
    assert generate(pipe).shape == (32, 32, 3)
