"""The flow-matching profiles (SD 3.5, Flux) end to end through `sdflow run` with tiny components of
their family (`tiny_sd3`, `tiny_flux`), as tests/flows/test_profile_runs.py runs the others: only
sizes, paths, step counts, T5's length (the tiny T5 takes 64 tokens) and what cannot run offline
are overridden; LoRA targets, bf16, gradient checkpointing, the flow settings and the guidance are
the profile's. The exported LoRA loads with diffusers' own pipeline class and changes its images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file

from sdflow.cli import main
from sdflow.profiles import load_profile

pytestmark = pytest.mark.slow

SIZES = [
    "download.resolution=32", "filter.min_size=16", "latents.batch_size=8",
    "latents.buckets={resolution: 32, step: 16}", "model.max_sequence_length=16",
    "train.max_steps=2", "train.checkpoint_every=2", "train.warmup_steps=1",
    "train.batch_size=2", "train.gradient_accumulation=1", "train.lr=0.01",
    "eval.held_out_fraction=0.25", "eval.num_prompts=2", "eval.num_inference_steps=2",
    "eval.fid_features=random-cnn", "eval.fid_samples=2", "eval.clip_model=null",
    "eval.batch_size=2", "eval.baseline=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    from sdflow.data.sources.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("flow-profile-runs") / "data"
    return make_demo_dataset(root, count=12, seed=0, size=32)


# what only a CUDA host runs, swapped for what this CPU runs (as the UNet profiles' fp16 -> fp32):
# nf4 (bitsandbytes) -> torchao's int8
CPU_STAND_INS = {"flux-dev-lora-24gb": ["model.quantize=int8"]}


def run(profile: str, pipeline: Path, folder: Path, workdir: Path) -> dict:
    args = ["run", profile, "--workdir", str(workdir)]
    sized = [f"source.path={folder}", f"model.pretrained={pipeline}", *SIZES]
    for item in [*sized, *CPU_STAND_INS.get(profile, [])]:
        args += ["--set", item]
    assert main(args) == 0
    (run_dir,) = (workdir / "runs").glob("*")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary["stages"]
    assert summary["metrics"]["trained"]["fid"] is not None
    return summary


def generate(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", height=32, width=32, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0), max_sequence_length=16)  # fmt: skip
    return out.images[0]


@pytest.mark.parametrize(
    ("profile", "family"),
    [
        ("sd35-medium-lora-24gb", "sd3"),
        ("sd35-large-lora-48gb", "sd3"),
        ("flux-dev-lora-48gb", "flux"),
        ("flux-dev-lora-24gb", "flux"),
    ],
)
def test_flow_lora_profile_runs(prefect_server, small_folder, tmp_path, request, profile, family):
    config = load_profile(profile)
    assert (config.train.mode, config.train.mixed_precision) == ("lora", "bf16")
    assert config.train.gradient_checkpointing and config.model.max_sequence_length
    pipeline = request.getfixturevalue(f"tiny_{family}")
    summary = run(profile, pipeline, small_folder, tmp_path / "work")
    cls = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    base = generate(cls.from_pretrained(pipeline))
    pipe = cls.from_pretrained(pipeline)
    pipe.load_lora_weights(summary["model_dir"])
    assert not np.allclose(generate(pipe), base, atol=1e-3)


def test_flux_dev_finetune_80gb(prefect_server, small_folder, tiny_flux, tmp_path):
    """A full fine-tune in bf16 master weights with Adafactor: the checkpoint's weights are bf16
    (no float32 copy); the exported pipeline loads with FluxPipeline and its images differ from
    the base's."""
    train = load_profile("flux-dev-finetune-80gb").train
    assert (train.mode, train.master_weights, train.optimizer) == ("full", "bfloat16", "adafactor")
    summary = run("flux-dev-finetune-80gb", tiny_flux, small_folder, tmp_path / "work")
    (checkpoint,) = Path(summary["model_dir"]).parent.glob("checkpoints/step-*/model.safetensors")
    assert {v.dtype for v in load_file(checkpoint).values()} == {torch.bfloat16}
    tuned = generate(FluxPipeline.from_pretrained(summary["model_dir"]))
    assert not np.allclose(tuned, generate(FluxPipeline.from_pretrained(tiny_flux)), atol=1e-3)


def test_a_sweep_over_an_sd3_flow_setting(prefect_server, small_folder, tiny_sd3, tmp_path):
    """`sdflow sweep` over `train.flow.weighting` on the SD 3.5 profile: one latents stage shared,
    two trained LoRAs that differ, each scored."""
    args = ["sweep", "sd35-medium-lora-24gb", "--workdir", str(tmp_path),
            "--grid", "train.flow.weighting=none,cosmap", "--metric", "fid"]  # fmt: skip
    for item in [f"source.path={small_folder}", f"model.pretrained={tiny_sd3}", *SIZES]:
        args += ["--set", item]
    assert main(args) == 0
    (path,) = (tmp_path / "sweeps").glob("*/summary.json")
    settings = json.loads(path.read_text())["settings"]
    assert [s["setting"] for s in settings] == [
        {"train.flow.weighting": "none"},
        {"train.flow.weighting": "cosmap"},
    ]
    assert all(s["status"] == "completed" and s["metrics"]["fid"] is not None for s in settings)
    assert len({s["outputs"]["latents"] for s in settings}) == 1
    weights = [
        (Path(s["model_dir"]) / "pytorch_lora_weights.safetensors").read_bytes() for s in settings
    ]
    assert weights[0] != weights[1]  # the weighting reached the loss
