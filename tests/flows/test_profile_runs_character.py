"""The `character-lora` profile end to end through `sdflow run`, with its own settings and tiny SDXL
components (as tests/flows/test_profile_runs.py does for the other profiles).

The profile's recipe stays as written: one subset with repeats 10 and a trigger prefix, booru-tag
captions shuffled per step with the trigger kept first, prior preservation with class images the
base generates in the `class_images` stage, DoRA, Prodigy, bf16. Only sizes, step counts, the
folder and the hub models are overridden. The exported adapter is loaded the way users load it
(`StableDiffusionXLPipeline.load_lora_weights`) and must change the base's image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from diffusers import StableDiffusionXLPipeline
from fixtures.pipelines import seeded_image

from sdflow.cli import main
from sdflow.profiles import load_profile
from sdflow.store.stageio import load_manifest
from sdflow.training.latent_data import read_shard_ids

pytestmark = pytest.mark.slow

IMAGES = 30
SIZES = [
    "download.resolution=32", "filter.min_size=16", "latents.batch_size=8",
    "latents.buckets={resolution: 32, step: 16}", "train.max_steps=2", "train.checkpoint_every=2",
    "train.batch_size=2", "train.prior_preservation.num_class_images=2",
    "train.prior_preservation.steps=2", "train.prior_preservation.batch_size=2",
    "eval.held_out_fraction=0.1", "eval.images_per_prompt=1", "eval.num_inference_steps=2",
    "eval.fid_features=random-cnn", "eval.fid_samples=4", "eval.clip_model=null",
]  # fmt: skip


def tagged(caption: str) -> str:
    """The demo's sentence as booru-style tags: 'a red circle on a white background' -> 'red,
    circle, white background'."""
    words = caption.removeprefix("a ").split(" on a ")
    colour, shape = words[0].split(" ", 1)
    return f"{colour}, {shape}, {words[1]}"


@pytest.fixture(scope="module")
def character_folder(tmp_path_factory) -> Path:
    """30 demo images with a tag caption beside each (`NAME.txt`, which the folder source reads
    before metadata.jsonl)."""
    from sdflow.data.sources.demo import make_demo_dataset

    root = make_demo_dataset(tmp_path_factory.mktemp("character") / "data", count=IMAGES, size=32)
    for line in (root / "metadata.jsonl").read_text().splitlines():
        row = json.loads(line)
        (root / row["file_name"]).with_suffix(".txt").write_text(tagged(row["caption"]))
    return root


def test_character_lora(prefect_server, tiny_sdxl, character_folder, tmp_path):
    profile = load_profile("character-lora")
    (subset,) = profile.subsets
    train = profile.train
    assert (subset.repeats, subset.caption.prefix) == (10, "sks, ")
    assert (train.lora_type, train.optimizer, train.caption_shuffle, train.keep_tokens) == (
        "dora", "prodigy", True, 1)  # fmt: skip
    assert train.prior_preservation.class_prompt == "a photo of a woman"
    workdir = tmp_path / "work"
    overrides = [
        f"subsets.0.source.path={character_folder}",
        f"model.pretrained={tiny_sdxl}",
        f"model.vae={tiny_sdxl / 'vae'}",  # stands in for the fp16-safe VAE
        *SIZES,
    ]
    args = ["run", "character-lora", "--workdir", str(workdir)]
    assert main([*args, *[x for item in overrides for x in ("--set", item)]]) == 0
    (run_dir,) = (workdir / "runs").glob("*")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary["stages"]
    stages = summary["stages"]
    assert {"download[character]", "subsets", "class_images", "train"} <= set(stages)
    report = load_manifest(Path(stages["train"]["output"]))["info"]["subsets"]
    latents = Path(stages["latents"]["output"])
    trained = [i for p in sorted(latents.glob("latents-*")) for i in read_shard_ids(p)]
    assert {i.split("/")[0] for i in trained} == {"character"}
    # the images not held out for evaluation; 2 steps x batch 2 x the profile's accumulation seen
    seen = 2 * 2 * train.gradient_accumulation
    assert report == {"character": {"images": len(trained), "repeats": 10, "samples_seen": seen}}
    class_images = load_manifest(Path(stages["class_images"]["output"]))["counts"]
    assert class_images == {"class_images": 2, "generated": 2}  # by the base, this run

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    base = seeded_image(pipe, "sks, red, circle, white background")
    pipe.load_lora_weights(summary["model_dir"])
    tuned = seeded_image(pipe, "sks, red, circle, white background")
    assert np.isfinite(tuned).all() and np.ptp(tuned) > 1e-3
    assert not np.array_equal(tuned, base), "the DoRA adapter did not change the output"
