"""SDXL through the latents and train stages on the tiny SDXL pipeline (`tiny_sdxl`): the cached
conditioning equals diffusers' own, LoRA and full fine-tunes export pipelines diffusers loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from fixtures.pipelines import seeded_image
from fixtures.stages import GRID, caption_stage, crash_at_checkpoint, downloaded_rows, samples
from safetensors.torch import load_file

import sdflow.models.families.sdxl as sdxl
from flows.pipeline import check_family_options
from sdflow.errors import UserError
from sdflow.models.families import family_of
from sdflow.profiles import load_profile
from sdflow.training.encoding import Encoders, vae_precision
from sdflow.training.latent_data import CachedLatents, load_empty_prompts
from sdflow.training.schedules import collate
from tasks.latents import cache_latents
from tasks.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sdxl_config(pipeline: Path, *overrides: str):
    options = ["model.init=pretrained", f"model.pretrained={pipeline}", *overrides]
    return load_profile("tiny-test", options)


@pytest.fixture(scope="module")
def sdxl_latents(tiny_sdxl, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sdxl-work")
    config = sdxl_config(tiny_sdxl, "eval.held_out_fraction=0.25", "latents.shard_size=8")
    upstream = {"caption": caption_stage(workdir, samples(16)), "autoencoder": None}
    return workdir, config, upstream, cache_latents(config, upstream, str(workdir))


@pytest.fixture(scope="module")
def reference(tiny_sdxl) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)


def test_family_comes_from_model_index(tiny_sdxl):
    assert family_of(sdxl_config(tiny_sdxl)).name == "sdxl"
    assert family_of(load_profile("tiny-test")).name == "sd"
    with pytest.raises(UserError, match="model.family is 'sd' but .* is a 'sdxl' pipeline"):
        family_of(sdxl_config(tiny_sdxl, "model.family=sd"))


def test_cached_text_pooled_and_time_ids_equal_the_pipelines(sdxl_latents, reference):
    workdir, config, _, manifest = sdxl_latents
    data = CachedLatents(workdir, manifest)
    rows = [data[i] for i in range(3)]
    captions = {s["id"]: s["caption"] for s in samples(16)}
    for row in rows:
        text, _, pooled, _ = reference.encode_prompt(
            captions[row["id"]], device="cpu", do_classifier_free_guidance=False
        )
        torch.testing.assert_close(row["text"], text[0])
        torch.testing.assert_close(row["pooled"], pooled[0])
    empty, _, empty_pooled, _ = reference.encode_prompt(
        "", device="cpu", do_classifier_free_guidance=False
    )
    cached = load_empty_prompts(workdir, manifest)
    torch.testing.assert_close(cached["text"], empty[0])
    torch.testing.assert_close(cached["pooled"], empty_pooled[0])
    # no recorded size or crop: the square crop of the resolution at (0, 0), target 32 x 32
    batch = collate(rows)
    expected = reference._get_add_time_ids(
        (32, 32), (0, 0), (32, 32), torch.float32, text_encoder_projection_dim=32
    )
    ids = sdxl.batch_time_ids(batch, (8, 8), manifest["info"])
    assert torch.equal(ids, expected.expand(3, 6))


def test_time_ids_of_a_cropped_non_square_sample(sdxl_latents, reference):
    """Rows that record the source size and crop (the buckets' latents) condition on them."""
    _, _, _, manifest = sdxl_latents
    batch = {
        "mean": torch.zeros(2, 4, 6, 8),  # a 24 x 32 px latent
        "original_size": torch.tensor([[300, 500], [48, 64]]),
        "crop_top_left": torch.tensor([[0, 70], [6, 0]]),
    }
    ids = sdxl.batch_time_ids(batch, (6, 8), manifest["info"])
    for i, (size, crop) in enumerate((((300, 500), (0, 70)), ((48, 64), (6, 0)))):
        expected = reference._get_add_time_ids(
            size, crop, (24, 32), torch.float32, text_encoder_projection_dim=32
        )
        assert torch.equal(ids[i : i + 1], expected)


def test_fp16_encoding_upcasts_an_sdxl_vae_that_asks(sdxl_latents, reference):
    _, config, _, manifest = sdxl_latents
    family = family_of(config)
    half = config.model_copy(deep=True)
    half.latents.mixed_precision = "fp16"
    vae = reference.vae
    assert vae.config.force_upcast  # AutoencoderKL's default, and SDXL's VAE config
    assert vae_precision(half, Encoders(vae, None, family, torch.device("cpu"), [])) is None
    vae.register_to_config(force_upcast=False)  # an fp16-safe VAE
    try:
        encoders = Encoders(vae, None, family, torch.device("cpu"), [])
        assert vae_precision(half, encoders) is torch.float16
    finally:
        vae.register_to_config(force_upcast=True)
    sd = family_of(load_profile("tiny-test"))  # SD ignores the flag, as its pipeline does
    assert vae_precision(half, Encoders(vae, None, sd, torch.device("cpu"), [])) is torch.float16
    assert manifest["info"]["family"] == "sdxl"


def test_unsupported_sdxl_options_are_refused(tiny_sdxl, sdxl_latents):
    workdir, _, upstream, _ = sdxl_latents
    uncached = sdxl_config(tiny_sdxl, "train.cache_latents=false")
    with pytest.raises(UserError, match="train.cache_latents is false but the model is SDXL"):
        check_family_options(uncached)  # the pipeline flow's check, before its first stage
    with pytest.raises(UserError, match="train.cache_latents is false but the model is SDXL"):
        cache_latents(uncached, upstream, str(workdir))
    check_family_options(sdxl_config(tiny_sdxl))  # the supported settings pass


# ------------------------------------------------------------------------------------------ train

TRAIN = ["train.max_steps=4", "train.checkpoint_every=2", "train.batch_size=4", "train.log_every=1"]


def workdir_with(latents_workdir: Path, workdir: Path) -> str:
    """A fresh workdir that sees the fixture's latents stage (stage paths are workdir-relative)."""
    (workdir / "stages").mkdir(parents=True)
    (workdir / "stages" / "latents").symlink_to(latents_workdir / "stages" / "latents")
    return str(workdir)


def generate(pipe: StableDiffusionXLPipeline):
    return seeded_image(pipe, "a red square")


def test_lora_with_ema_min_snr_v_prediction_resumes_exactly_and_loads(
    tiny_sdxl, sdxl_latents, reference, tmp_path, monkeypatch
):
    root, _, _, latents = sdxl_latents
    options = ["train.mode=lora", "train.ema=true", "train.snr_gamma=5.0", "train.lr=0.05",
               "train.prediction_type=v_prediction", "train.caption_dropout=0.3"]  # fmt: skip
    config = sdxl_config(tiny_sdxl, *TRAIN, *options)
    upstream = {"latents": latents, "autoencoder": None, "caption": None}
    straight = train(config, upstream, workdir_with(root, tmp_path / "straight"))
    undo = crash_at_checkpoint(monkeypatch, 4)
    with pytest.raises(OSError):
        train(config, upstream, workdir_with(root, tmp_path / "crashed"))
    undo()
    resumed = train(config, upstream, str(tmp_path / "crashed"))
    assert resumed["info"]["resumed_from_step"] == 2
    assert resumed["fingerprint"] == straight["fingerprint"]  # the same adapter, bitwise
    assert resumed["info"]["prediction_type"] == "v_prediction"

    base = generate(reference)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_lora_weights(str(tmp_path / "straight" / straight["path"] / "lora"))
    assert not np.allclose(generate(pipe), base, atol=1e-3)  # the adapter took effect


def test_full_finetune_with_validation_exports_an_sdxl_pipeline(
    tiny_sdxl, sdxl_latents, reference, tmp_path
):
    root, _, _, latents = sdxl_latents
    options = ["train.ema=true", "train.ema_decay=0.5", "train.snr_gamma=5.0",
               "train.validate_every=2", "train.validation_images=2"]  # fmt: skip
    config = sdxl_config(tiny_sdxl, *TRAIN, *options, "eval.held_out_fraction=0.25")
    upstream = {"latents": latents, "autoencoder": None, "caption": None}
    manifest = train(config, upstream, workdir_with(root, tmp_path))
    out = tmp_path / manifest["path"]
    validation = manifest["info"]["validation"]
    assert len(validation["curve"]) == 2 and (out / validation["grid"]).is_file()
    pipe = StableDiffusionXLPipeline.from_pretrained(out / "pipeline")
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"  # the base's own sampler
    trained = dict(pipe.unet.named_parameters())
    changed = [n for n, p in reference.unet.named_parameters() if not torch.equal(p, trained[n])]
    assert changed and any("add_embedding" in n for n in changed)  # the size/pooled path trains
    assert generate(pipe).shape == (32, 32, 3)


@pytest.mark.parametrize("choice", ["lora", "full"])
def test_both_text_encoders_train_and_export(tiny_sdxl, reference, tmp_path, choice):
    config = sdxl_config(tiny_sdxl, *TRAIN, f"train.mode={choice}", f"train.text_encoder={choice}",
                         "train.lr=0.01", "eval.held_out_fraction=0")  # fmt: skip
    rows = samples(8)
    upstream = {"caption": caption_stage(tmp_path, rows), "autoencoder": None}
    latents = cache_latents(config, upstream, str(tmp_path))
    row = CachedLatents(tmp_path, latents)[0]
    caption = {s["id"]: s["caption"] for s in rows}[row["id"]]
    ids = [tok(caption, padding="max_length", max_length=16, truncation=True).input_ids
           for tok in (reference.tokenizer, reference.tokenizer_2)]  # fmt: skip
    assert row["input_ids"].tolist() == ids[0] + ids[1]  # both tokenizers' ids, side by side
    manifest = train(config, {**upstream, "latents": latents}, str(tmp_path))
    out = tmp_path / manifest["path"]
    if choice == "lora":
        keys = load_file(out / "lora" / "pytorch_lora_weights.safetensors").keys()
        assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
        pipe.load_lora_weights(str(out / "lora"))
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(out / "pipeline")
    kwargs = {"device": "cpu", "do_classifier_free_guidance": False}
    text, _, pooled, _ = pipe.encode_prompt("a red square", **kwargs)
    base_text, _, base_pooled, _ = reference.encode_prompt("a red square", **kwargs)
    # each encoder's half of the states, and the pooled projection, moved off the base's
    assert not torch.allclose(text[..., :32], base_text[..., :32])
    assert not torch.allclose(text[..., 32:], base_text[..., 32:])
    assert not torch.allclose(pooled, base_pooled)
    assert generate(pipe).shape == (32, 32, 3)


def test_lora_trains_on_non_square_buckets_with_their_size_conditioning(
    tiny_sdxl, reference, tmp_path, monkeypatch
):
    """Mixed-aspect rows (square, 2:1, 1:2, 4:3 originals) cached in buckets and trained: batches
    of non-square latents reach the UNet, each row conditioned on its own original size, crop and
    bucket size exactly as diffusers' SDXL pipeline computes them."""
    config = sdxl_config(tiny_sdxl, *TRAIN, "train.mode=lora", "download.resize_mode=max_area",
                         GRID, "eval.held_out_fraction=0")  # fmt: skip
    upstream = {"caption": caption_stage(tmp_path, downloaded_rows()), "autoencoder": None}
    latents = cache_latents(config, upstream, str(tmp_path))
    assert latents["info"]["buckets"]["40x24"] == 6 and latents["info"]["buckets"]["24x40"] == 3
    real, seen = sdxl.batch_time_ids, []

    def recorded(rows, latent_hw, info):
        ids = real(rows, latent_hw, info)
        seen.append((latent_hw, rows["original_size"].clone(), rows["crop_top_left"].clone(), ids))
        return ids

    monkeypatch.setattr(sdxl, "batch_time_ids", recorded)
    manifest = train(config, {**upstream, "latents": latents}, str(tmp_path))
    assert manifest["counts"]["steps"] == 4
    assert {hw for hw, *_ in seen} >= {(6, 10), (10, 6)}  # 40x24 and 24x40 px: non-square
    for (height, width), originals, crops, ids in seen:
        for original, crop, row_ids in zip(originals, crops, ids, strict=True):
            expected = reference._get_add_time_ids(
                tuple(original.tolist()), tuple(crop.tolist()), (height * 4, width * 4),
                torch.float32, text_encoder_projection_dim=32,
            )  # fmt: skip
            assert torch.equal(row_ids[None], expected)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_lora_weights(str(tmp_path / manifest["path"] / "lora"))
    assert not np.array_equal(generate(pipe), generate(reference))  # the adapter took effect
