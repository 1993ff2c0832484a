"""sdxl-finetune-4x24gb end to end through `sdflow run` on CPU: FSDP over gloo processes, tiny SDXL.

Sized down as in test_profile_runs.py (resolution, steps, batch sizes, sample counts, the random-CNN
FID features, no CLIP score); the four GPU processes become two CPU processes (the test's CPU budget)
and the images come from a local folder instead of a URL list. Every training setting but those is
the profile's: full fine-tune, FSDP full sharding, bf16, gradient checkpointing, min-SNR, caption
dropout, warmup. The exported pipeline is loaded with diffusers and generates.
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

PROFILE = "sdxl-finetune-4x24gb"
SIZES = [
    "download.resolution=32", "filter.min_size=16", "filter.min_caption_words=1",
    "latents.batch_size=8", "train.max_steps=2", "train.checkpoint_every=2",
    "train.warmup_steps=1", "train.processes=2", "eval.held_out_fraction=0.25",
    "eval.num_prompts=2", "eval.num_inference_steps=2", "eval.fid_features=random-cnn",
    "eval.fid_samples=4", "eval.clip_model=null", "eval.batch_size=4",
]  # fmt: skip


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    from sdflow.data.sources.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("multinode-profile") / "data"
    return make_demo_dataset(root, count=16, seed=0, size=32)


def test_sdxl_finetune_4x24gb_shards_and_exports_a_pipeline(
    prefect_server, small_folder, tiny_sdxl, tmp_path
):
    profile = load_profile(PROFILE)
    assert (profile.train.sharding, profile.train.processes, profile.train.mode) == (
        "fsdp", 4, "full")  # fmt: skip
    global_batch = profile.train.processes * profile.train.batch_size
    assert global_batch * profile.train.gradient_accumulation == 16  # the 80 GB profile's
    source = ["source.kind=folder", f"source.path={small_folder}"]
    args = ["run", PROFILE, "--workdir", str(tmp_path / "work")]
    for item in [*source, f"model.pretrained={tiny_sdxl}", *SIZES]:
        args += ["--set", item]
    assert main(args) == 0
    (run_dir,) = (tmp_path / "work" / "runs").glob("*")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary["stages"]
    model_dir = Path(summary["model_dir"])
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    # the export is the gathered full UNet, not one process's shard: every tensor at full shape,
    # and the fine-tune moved it away from the base
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl).unet.state_dict()
    trained = pipe.unet.state_dict()
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in base.items()}
    assert any(not torch.equal(trained[k].float(), base[k].float()) for k in base)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", height=32, width=32, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]  # fmt: skip
    assert image.shape == (32, 32, 3)
