"""Every profile end to end through `sdflow run`, with its own settings and tiny components.

Only sizes (resolution, channels via tiny local models, batch sizes, sample counts), paths, step
counts and what cannot run offline on a CPU are overridden: hub models become tiny local ones of
the same family, `kind: urls` lists point at a loopback server of the shared image folder, the
Inception FID features become `random-cnn`, the CLIP score is off, and fp16 training (a GPU's)
becomes fp32. Every other setting (schedule, warmup, prediction type, LoRA, EMA, min-SNR, caption
dropout, checkpointing, caption backend and decoding) is the profile's. The outputs are used the
way users use them: pipelines reload with diffusers and generate; caption runs' captions are read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from fixtures.pipelines import seeded_image
from fixtures.servers import serving_folder

from sdflow.cli import main
from sdflow.profiles import load_profile
from sdflow.store.stageio import load_manifest, read_shards

pytestmark = pytest.mark.slow

SIZES = [
    "download.resolution=32", "filter.min_size=16", "latents.batch_size=8",
    "train.max_steps=2", "train.checkpoint_every=2", "train.warmup_steps=1",
    "train.batch_size=2", "train.gradient_accumulation=2", "eval.held_out_fraction=0.25",
    "eval.num_inference_steps=2", "eval.fid_features=random-cnn", "eval.fid_samples=4",
    "eval.clip_model=null", "eval.batch_size=4",
]  # fmt: skip
TWO_PROMPTS = ["eval.num_prompts=2"]
FROM_SCRATCH = [
    "autoencoder.steps=2", "autoencoder.batch_size=4", "autoencoder.checkpoint_every=2",
    "autoencoder.unseen_samples=4",
]  # fmt: skip
CAPTION_ONLY = "download,filter,caption"  # what the caption profiles are run with
FP32 = ["train.mixed_precision=no"]  # fp16 autocast training needs a GPU


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    from sdflow.data.sources.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("profile-runs") / "data"
    return make_demo_dataset(root, count=16, seed=0, size=32)


@pytest.fixture(scope="module")
def url_list(small_folder: Path, tmp_path_factory) -> Iterator[Path]:
    """A LAION-style parquet list (url, caption) of the small folder, served on 127.0.0.1."""
    with serving_folder(small_folder) as base:
        rows = [
            json.loads(line) for line in (small_folder / "metadata.jsonl").read_text().splitlines()
        ]
        table = pa.table({"url": [f"{base}/{r['file_name']}" for r in rows],
                          "caption": [r["caption"] for r in rows]})  # fmt: skip
        path = tmp_path_factory.mktemp("url-list") / "urls.parquet"
        pq.write_table(table, path)
        yield path


def source_of(profile: str, folder: Path, urls: Path) -> list[str]:
    """The profile's own source kind, on the local images."""
    if load_profile(profile).source.kind == "urls":
        return [f"source.path={urls}", "download.allow_private_network=true"]
    return [f"source.path={folder}"]


def run_profile(profile: str, workdir: Path, overrides: list[str], only: str = "") -> dict:
    args = ["run", profile, "--workdir", str(workdir), *(["--only", only] if only else [])]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    (run_dir,) = (workdir / "runs").glob("*")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary["stages"]
    if not only:
        assert summary["metrics"]["trained"]["fid"] is not None
    return summary


def generate(pipe) -> np.ndarray:
    """A 32 px image at seed 0, as floats; fails unless it is finite and not one flat colour."""
    image = seeded_image(pipe)
    assert image.shape == (32, 32, 3)
    assert np.isfinite(image).all()
    assert np.ptp(image) > 1e-3, "a constant image"
    return image


def assert_lora_changes(pipe, lora_dir: str) -> None:
    """The LoRA, loaded on its base, changes the base's image at the same seed."""
    base = generate(pipe)
    pipe.load_lora_weights(lora_dir)
    tuned = generate(pipe)
    assert not np.array_equal(tuned, base), "the LoRA did not change the output"


@pytest.fixture
def run(prefect_server, small_folder, url_list, tmp_path):
    """`run(profile, *overrides, only=...)`: the profile on the local images, sized down."""

    def start(profile: str, *overrides: str, only: str = "", workdir: str = "work") -> dict:
        source = source_of(profile, small_folder, url_list)
        sized = [] if only else SIZES
        return run_profile(profile, tmp_path / workdir, [*source, *sized, *overrides], only)

    return start


def test_sdxl_lora_24gb(run, tiny_sdxl):
    profile = load_profile("sdxl-lora-24gb")
    assert (profile.train.mode, profile.train.gradient_checkpointing) == ("lora", True)
    assert profile.download.resize_mode == "max_area" and profile.latents.buckets.resolution == 1024
    vae = f"model.vae={tiny_sdxl / 'vae'}"  # stands in for the fp16-safe VAE
    buckets = "latents.buckets={resolution: 32, step: 16}"
    summary = run("sdxl-lora-24gb", f"model.pretrained={tiny_sdxl}", vae, buckets, *FP32,
                  *TWO_PROMPTS)  # fmt: skip
    assert_lora_changes(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl), summary["model_dir"])


def test_sdxl_finetune_80gb(run, tiny_sdxl):
    profile = load_profile("sdxl-finetune-80gb")
    assert (profile.train.mode, profile.train.ema, profile.train.mixed_precision) == (
        "full", True, "bf16")  # fmt: skip
    summary = run("sdxl-finetune-80gb", f"model.pretrained={tiny_sdxl}", *TWO_PROMPTS)
    generate(StableDiffusionXLPipeline.from_pretrained(summary["model_dir"]))


def test_sd15_lora_12gb(run, tiny_sd15):
    profile = load_profile("sd15-lora-12gb")
    assert (profile.train.mode, profile.train.mixed_precision) == ("lora", "fp16")
    summary = run("sd15-lora-12gb", f"model.pretrained={tiny_sd15}", *FP32, *TWO_PROMPTS)
    assert_lora_changes(StableDiffusionPipeline.from_pretrained(tiny_sd15), summary["model_dir"])


def test_sd15_finetune_24gb(run, tiny_sd15):
    profile = load_profile("sd15-finetune-24gb")
    assert (profile.train.mode, profile.train.ema, profile.train.lr_scheduler) == (
        "full", True, "constant_with_warmup")  # fmt: skip
    summary = run("sd15-finetune-24gb", f"model.pretrained={tiny_sd15}", *TWO_PROMPTS)
    pipe = StableDiffusionPipeline.from_pretrained(summary["model_dir"])
    assert pipe.scheduler.config.prediction_type == "epsilon"
    generate(pipe)


def test_sd21_768_v(run, tiny_sd21):
    assert load_profile("sd21-768-v").train.prediction_type == "v_prediction"
    summary = run("sd21-768-v", f"model.pretrained={tiny_sd21}", *TWO_PROMPTS)
    pipe = StableDiffusionPipeline.from_pretrained(summary["model_dir"])
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # what SD 2.1 samples with
    generate(pipe)


def test_scratch_small(run):
    tiny = [  # the profile's block types and depth; 32 px images make 4 px latents
        "model.unet.block_out_channels=[32, 32, 64]", "model.unet.layers_per_block=1",
        "model.unet.sample_size=4", "model.unet.cross_attention_dim=32",
        "model.vae_config.block_out_channels=[32, 32, 32, 32]",
        "model.vae_config.layers_per_block=1",
        "model.vae_config.sample_size=32", "model.text_encoder.hidden_size=32",
        "model.text_encoder.intermediate_size=64", "model.text_encoder.num_hidden_layers=1",
        "model.text_encoder.num_attention_heads=2", "model.tokenizer_vocab_size=768",
    ]  # fmt: skip
    summary = run("scratch-small", *tiny, *FROM_SCRATCH, *TWO_PROMPTS)
    generate(StableDiffusionPipeline.from_pretrained(summary["model_dir"]))


def test_tiny_cpu_then_tiny_cpu_finetune(run):
    base = run("tiny-cpu", *FROM_SCRATCH, *TWO_PROMPTS, workdir="demo")
    generate(StableDiffusionPipeline.from_pretrained(base["model_dir"]))
    prompts = (
        "eval.prompts=[a purple cross on a black background, a red circle on a white background]"
    )
    tuned = run("tiny-cpu-finetune", f"model.pretrained={base['model_dir']}", prompts,
                "eval.images_per_prompt=1", workdir="finetune")  # fmt: skip
    generate(StableDiffusionPipeline.from_pretrained(tuned["model_dir"]))


def captions(summary: dict) -> tuple[dict, list[dict]]:
    """The caption stage's manifest and rows, as `sdflow run --only ...,caption` left them."""
    output = Path(summary["stages"]["caption"]["output"])
    manifest = load_manifest(output)
    workdir = output.parents[2]  # <workdir>/stages/caption/<key>
    rows = [r for t in read_shards(workdir, manifest) for r in t.to_pylist()]
    assert len(rows) == manifest["counts"]["kept"] == 16
    return manifest, rows


def test_laion_blip_caption(run, tiny_blip, caption_words):
    assert "--only download,filter,caption" in load_profile("laion-blip-caption").description
    summary = run("laion-blip-caption", f"caption.model={tiny_blip}", "download.resolution=32",
                  "filter.min_size=16", "caption.batch_size=8", only=CAPTION_ONLY)  # fmt: skip
    manifest, rows = captions(summary)
    assert manifest["info"]["backend"] == "blip"
    for row in rows:  # BLIP's words, not the alt text's ("a red circle on a white background")
        assert row["caption"] and set(row["caption"].split(" ")) <= set(caption_words), row
        assert row["source_caption"]


def test_clip_interrogator_fast(run, tiny_blip, tiny_clip_77, term_lists, caption_words):
    summary = run("clip-interrogator-fast", f"caption.model={tiny_blip}",
                  f"caption.interrogator.clip_model={tiny_clip_77}",
                  f"caption.interrogator.data_path={term_lists}", "download.resolution=32",
                  "filter.min_size=16", "caption.batch_size=8", only=CAPTION_ONLY)  # fmt: skip
    manifest, rows = captions(summary)
    assert manifest["info"]["backend"] == "clip-interrogator"
    for row in rows:  # a BLIP caption, then CLIP-ranked terms
        base, *ranked = row["caption"].split(", ")
        assert set(base.split(" ")) <= set(caption_words) and ranked, row
