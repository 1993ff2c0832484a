"""The latents stage on a tiny caption-stage output: shapes, ids, held-out split, keys, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from fixtures.stages import (
    BACKGROUNDS,
    BROKEN,
    COLOURS,
    autoencoder_stage,
    caption_stage,
    fresh_fingerprint,
    samples,
    shape_png,
)
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from sdflow.models import components as models
from sdflow.models import files
from sdflow.profiles import load_profile
from sdflow.store.splits import is_held_out
from sdflow.store.stageio import output_dir, read_failures, stage_dir
from sdflow.training import encoding
from sdflow.training.latent_data import (
    CachedLatents,
    held_out_latents,
    load_empty_prompts,
    read_shard_captions,
)
from tasks.latents import cache_latents, latents_key


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # for the module: its subprocess compares bitwise with one thread
    workdir = tmp_path_factory.mktemp("work")
    config = load_profile("tiny-test")
    config.eval.held_out_fraction = 0.25
    config.latents.shard_size = 5
    config.latents.batch_size = 4
    upstream = {
        "caption": caption_stage(workdir, samples()),
        "autoencoder": autoencoder_stage(workdir, config.model, seed=0),
    }
    manifest = cache_latents(config, upstream, str(workdir))
    yield workdir, config, upstream, manifest
    torch.set_num_threads(threads)  # the next module of this test process starts as it would alone


def training_ids(fraction: float) -> list[str]:
    return [r["id"] for r in samples() if not is_held_out(r["id"], fraction)]


def encoders(workdir: Path, config, upstream, manifest):
    sources = models.component_sources(config, {**upstream, "latents": manifest}, str(workdir))
    vae = AutoencoderKL.from_pretrained(sources.vae)
    return (
        vae,
        CLIPTokenizer.from_pretrained(sources.tokenizer),
        CLIPTextModel.from_pretrained(sources.text_encoder),
    )


def test_encodes_every_training_sample_once(setup):
    workdir, config, _, manifest = setup
    train = training_ids(0.25)
    assert 0 < len(train) < 24 and BROKEN in train  # the fixture exercises both paths
    counts = manifest["counts"]
    assert counts["input"] == 24
    assert counts["held_out"] == 24 - len(train)
    assert counts["failed_by_reason"] == {"undecodable_image": 1}
    assert counts["encoded"] == len(train) - 1
    assert counts["encoded"] + counts["failed"] + counts["held_out"] == counts["input"]
    assert read_failures(workdir, manifest).column("id").to_pylist() == [BROKEN]
    data = CachedLatents(workdir, manifest)
    ids = [data[i]["id"] for i in range(len(data))]
    assert ids == [i for i in train if i != BROKEN]  # input order, no held-out id, none twice
    for path in manifest["shards"]:
        tensors = load_file(output_dir(workdir, manifest) / path)
        n = len(tensors["mean"])
        assert 0 < n <= config.latents.shard_size
        image_keys = {"mean", "std", "mean_flip", "std_flip"}
        assert set(tensors) == image_keys | {"text", "original_size", "crop_top_left"}
        assert tensors["mean"].shape == tensors["std_flip"].shape == (n, 4, 8, 8)
        # square 32 px sources, no crop: SDXL's micro-conditioning reads these per row
        assert tensors["original_size"].tolist() == [[32, 32]] * n
        assert tensors["crop_top_left"].tolist() == [[0, 0]] * n
        assert tensors["text"].shape == (n, 16, 32)
        assert tensors["mean"].dtype == torch.float32
    info = manifest["info"]
    assert (info["latent_channels"], info["latent_size"]) == (4, 8)
    assert (info["text_seq_len"], info["text_dim"], info["flip"]) == (16, 32, True)
    assert info["scaling_factor"] == pytest.approx(0.18215)
    assert info["buckets"] == {"32x32": counts["encoded"]}


def test_rows_pair_latents_with_their_own_captions(setup):
    """Shuffled by a DataLoader and by the shard sampler, every row is still its own sample."""
    workdir, config, upstream, manifest = setup
    vae, tokenizer, text_encoder = encoders(workdir, config, upstream, manifest)
    by_id = {r["id"]: r for r in samples()}
    data = CachedLatents(workdir, manifest)
    loader = torch.utils.data.DataLoader(data, batch_size=3, shuffle=True, collate_fn=list)
    seen = []
    with torch.no_grad():
        for batch in loader:
            pixels = torch.stack(
                [models.image_to_tensor(by_id[r["id"]]["image"], 32) for r in batch]
            )
            mean, std = models.encode_images(vae, pixels)
            flip_mean, _ = models.encode_images(vae, torch.flip(pixels, dims=[-1]))
            captions = [by_id[r["id"]]["caption"] for r in batch]
            text = models.encode_prompts(tokenizer, text_encoder, captions)
            for k, row in enumerate(batch):
                torch.testing.assert_close(row["mean"], mean[k], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(row["std"], std[k], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(row["mean_flip"], flip_mean[k], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(row["text"], text[k], atol=1e-5, rtol=1e-4)
                seen.append(row["id"])
    assert sorted(seen) == sorted(data[i]["id"] for i in range(len(data)))
    assert data.buckets() == [""] * len(data)  # no buckets: one square shape
    # flipped latents differ from the plain ones: the images are not symmetric
    assert not torch.allclose(data[0]["mean"], data[0]["mean_flip"])


def test_scratch_text_encoder_and_empty_prompt(setup):
    workdir, config, upstream, manifest = setup
    base = output_dir(workdir, manifest)
    assert manifest["files"]["tokenizer"] == "tokenizer"
    assert manifest["files"]["text_encoder"] == "text_encoder"
    assert list((base / "text_encoder").glob("*.safetensors"))
    _, tokenizer, text_encoder = encoders(workdir, config, upstream, manifest)
    assert tokenizer.model_max_length == 16
    assert text_encoder.config.vocab_size == len(tokenizer)
    empty = load_empty_prompts(workdir, manifest)["text"]
    assert empty.shape == (16, 32)
    with torch.no_grad():
        expected = models.encode_prompts(tokenizer, text_encoder, [""])[0]
    torch.testing.assert_close(empty, expected)
    # the seeded random encoder still tells different captions apart
    data = CachedLatents(workdir, manifest)
    assert not torch.allclose(data[0]["text"], data[1]["text"])


def test_same_inputs_reuse_and_changed_encoders_or_resolution_re_encode(setup):
    workdir, config, upstream, manifest = setup
    again = cache_latents(config, upstream, str(workdir))
    assert again["reused"] and again["key"] == manifest["key"]
    other_vae = {**upstream, "autoencoder": autoencoder_stage(workdir, config.model, seed=1)}
    swapped = cache_latents(config, other_vae, str(workdir))
    assert not swapped["reused"] and swapped["key"] != manifest["key"]
    first, second = CachedLatents(workdir, manifest), CachedLatents(workdir, swapped)
    assert first[0]["id"] == second[0]["id"]
    assert not torch.allclose(first[0]["mean"], second[0]["mean"])
    bigger = config.model_copy(deep=True)
    bigger.download.resolution = 64
    assert latents_key(bigger, upstream) != manifest["key"]
    seeded = config.model_copy(deep=True)
    seeded.model.seed = 3  # a different scratch text encoder
    assert latents_key(seeded, upstream) != manifest["key"]
    fewer = config.model_copy(deep=True)
    fewer.eval.held_out_fraction = 0.5
    assert latents_key(fewer, upstream) != manifest["key"]


def test_vae_directory_weights_decide_the_key(setup, tmp_path):
    workdir, config, upstream, _ = setup
    for seed in (0, 1):
        vae = models.build_vae(config.model.model_copy(update={"seed": seed}))
        files.save_component(vae, tmp_path / f"vae{seed}")
    keys = []
    for seed in (0, 1):
        own = config.model_copy(deep=True)
        own.model.vae = str(tmp_path / f"vae{seed}")
        keys.append(latents_key(own, {"caption": upstream["caption"], "autoencoder": None}))
    assert keys[0] != keys[1]


def pretrained_setup(setup, path: Path, tiny_sd15: Path):
    """The tiny SD 1.5 copied to `path / "sd"`, and the setup's config fine-tuning it."""
    _, config, _, _ = setup
    shutil.copytree(tiny_sd15, path / "sd")
    pretrained = config.model_copy(deep=True)
    pretrained.model = pretrained.model.model_copy(
        update={"init": "pretrained", "pretrained": str(path / "sd")}
    )
    return pretrained


def test_pretrained_encoders_come_from_the_pipeline(setup, tmp_path, tiny_sd15):
    workdir, _, upstream, _ = setup
    pretrained = pretrained_setup(setup, tmp_path, tiny_sd15)
    caption_only = {"caption": upstream["caption"], "autoencoder": None}
    manifest = cache_latents(pretrained, caption_only, str(workdir))
    assert "tokenizer" not in manifest["files"] and "text_encoder" not in manifest["files"]
    assert manifest["counts"]["encoded"] == len(training_ids(0.25)) - 1
    # new text-encoder weights in the same directory: a new key, nothing stale reused
    text = CLIPTextModel.from_pretrained(tmp_path / "sd" / "text_encoder")
    with torch.no_grad():
        text.final_layer_norm.bias.add_(1.0)
    files.save_component(text, tmp_path / "sd" / "text_encoder")
    assert latents_key(pretrained, caption_only) != manifest["key"]


def test_a_trained_text_encoder_gets_token_ids_instead_of_embeddings(setup, tmp_path, tiny_sd15):
    workdir, _, upstream, _ = setup
    frozen = pretrained_setup(setup, tmp_path, tiny_sd15)
    trained = frozen.model_copy(deep=True)
    trained.train = trained.train.model_copy(update={"mode": "lora", "text_encoder": "lora"})
    caption_only = {"caption": upstream["caption"], "autoencoder": None}
    assert latents_key(trained, caption_only) != latents_key(frozen, caption_only)
    embeddings = cache_latents(frozen, caption_only, str(workdir))
    manifest = cache_latents(trained, caption_only, str(workdir))
    assert not manifest["reused"] and manifest["key"] != embeddings["key"]
    assert manifest["info"]["captions"] == "input_ids" and "captions" not in embeddings["info"]
    assert (manifest["info"]["text_seq_len"], manifest["info"]["text_dim"]) == (16, 32)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "sd" / "tokenizer")

    def ids(caption: str) -> torch.Tensor:
        return torch.tensor(tokenizer(caption, padding="max_length", max_length=16).input_ids)

    captions = {r["id"]: r["caption"] for r in samples()}
    rows, same = CachedLatents(workdir, manifest), CachedLatents(workdir, embeddings)
    assert len(rows) == len(same) > 0
    for i in range(len(rows)):
        row = rows[i]
        assert row["text"] is None and row["input_ids"].dtype == torch.int64
        assert torch.equal(row["input_ids"], ids(captions[row["id"]]))
        assert torch.equal(row["mean"], same[i]["mean"])  # the images are cached as before
    assert torch.equal(load_empty_prompts(workdir, manifest)["input_ids"], ids(""))


RESUME_SCRIPT = """
import json, sys, time
import torch
import tasks.latents as stage
from sdflow.config import RunConfig
torch.set_num_threads(1)  # the same CPU kernels as the test process: bitwise-equal encodings
encode = stage._encode_shard
def slow(*args):  # one shard, then a pause long enough to be killed in
    encode(*args)
    time.sleep(60)
stage._encode_shard = slow
config = RunConfig.model_validate_json(open(sys.argv[1]).read())
stage.cache_latents(config, json.load(open(sys.argv[2])), sys.argv[3])
"""


def test_resume_after_kill_keeps_finished_shards(setup, tmp_path):
    workdir, config, upstream, _ = setup
    config = config.model_copy(deep=True)
    config.latents.shard_size = 4  # a key of its own: this build starts from nothing
    key = latents_key(config, upstream)
    partial = stage_dir(workdir, "latents", key).with_name(f".{key}.partial")
    (tmp_path / "config.json").write_text(config.model_dump_json())
    (tmp_path / "upstream.json").write_text(json.dumps(upstream))
    args = [sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / "config.json")]
    args += [str(tmp_path / "upstream.json"), str(workdir)]
    process = subprocess.Popen(args, cwd=Path(__file__).resolve().parents[2])
    first = partial / "latents-00000.safetensors"
    deadline = time.monotonic() + 120
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert first.exists(), "the subprocess never finished its first shard"
    assert not (partial / "latents-00001.safetensors").exists()
    stamp = first.stat().st_mtime_ns, first.stat().st_ino
    manifest = cache_latents(config, upstream, str(workdir))
    kept = output_dir(workdir, manifest) / "latents-00000.safetensors"
    assert (kept.stat().st_mtime_ns, kept.stat().st_ino) == stamp  # not encoded again
    assert manifest["counts"]["encoded"] == len(training_ids(0.25)) - 1
    assert len(CachedLatents(workdir, manifest)) == manifest["counts"]["encoded"]
    rebuild = lambda: cache_latents(config, upstream, str(workdir))  # noqa: E731
    assert fresh_fingerprint(workdir, manifest, rebuild) == manifest["fingerprint"]


def test_half_precision_without_flip(setup):
    workdir, config, upstream, _ = setup
    half = config.model_copy(deep=True)
    half.latents.flip, half.latents.dtype, half.latents.mixed_precision = False, "float16", "bf16"
    manifest = cache_latents(half, upstream, str(workdir))
    assert manifest["info"]["flip"] is False and manifest["info"]["dtype"] == "float16"
    row = CachedLatents(workdir, manifest)[0]
    assert row["mean_flip"] is None and row["std_flip"] is None
    assert row["mean"].dtype == row["text"].dtype == torch.float16
    # the same encodings as the float32 cache's, to bf16's precision
    full = CachedLatents(workdir, setup[3])
    (same,) = [full[i] for i in range(len(full)) if full[i]["id"] == row["id"]]
    for key in ("mean", "std", "text"):
        torch.testing.assert_close(row[key].float(), same[key], atol=0.05, rtol=0.05)


def test_non_finite_encodings_become_failures(setup, monkeypatch):
    """A row whose encoding is NaN (e.g. an fp16 VAE overflow) is reported, never cached."""
    workdir, config, upstream, _ = setup
    poisoned = samples()[0]
    assert not is_held_out(poisoned["id"], 0.25)
    target = models.image_to_tensor(poisoned["image"], 32)

    def encode_with_nan(vae, pixels):
        mean, std = models.encode_images(vae, pixels)
        hit = (pixels == target).flatten(1).all(1)
        return torch.where(hit[:, None, None, None], torch.nan, mean), std

    monkeypatch.setattr("sdflow.training.encoding.encode_images", encode_with_nan)
    other = config.model_copy(deep=True)
    other.latents.batch_size = 3  # a key of its own
    manifest = cache_latents(other, upstream, str(workdir))
    failures = read_failures(workdir, manifest)
    reasons = dict(zip(failures["id"].to_pylist(), failures["reason"].to_pylist(), strict=True))
    assert reasons == {poisoned["id"]: "non_finite_latent", BROKEN: "undecodable_image"}
    data = CachedLatents(workdir, manifest)
    assert poisoned["id"] not in {data[i]["id"] for i in range(len(data))}
    assert manifest["counts"]["encoded"] == len(training_ids(0.25)) - 2


def test_held_out_rows_are_cached_apart_with_their_captions(setup):
    workdir, config, upstream, manifest = setup
    by_id = {r["id"]: r for r in samples()}
    held = [r["id"] for r in samples() if is_held_out(r["id"], 0.25)]
    assert held and manifest["counts"]["validation"] == len(held)
    assert manifest["files"]["validation"] == "validation"
    data = held_out_latents(workdir, manifest)
    assert [data[i]["id"] for i in range(len(data))] == held  # input order, none trained on
    assert not set(held) & {CachedLatents(workdir, manifest)[i]["id"] for i in range(5)}
    base = output_dir(workdir, manifest)
    paths = sorted((base / "validation").glob("latents-*.safetensors"))
    captions = [c for p in paths for c in read_shard_captions(p)]
    assert captions == [by_id[i]["caption"] for i in held]
    vae, tokenizer, text_encoder = encoders(workdir, config, upstream, manifest)
    with torch.no_grad():
        pixels = torch.stack([models.image_to_tensor(by_id[i]["image"], 32) for i in held])
        mean, _ = models.encode_images(vae, pixels)
        text = models.encode_prompts(tokenizer, text_encoder, captions)
    for k in range(len(held)):
        torch.testing.assert_close(data[k]["mean"], mean[k], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(data[k]["text"], text[k], atol=1e-5, rtol=1e-4)


def test_a_grown_dataset_encodes_only_its_new_and_edited_images(
    setup, tmp_path, tiny_sd15, monkeypatch
):
    workdir, _, upstream, _ = setup
    pretrained = pretrained_setup(setup, tmp_path, tiny_sd15)
    pretrained.eval.held_out_fraction = 0.0  # every row is a training row
    first = cache_latents(
        pretrained, {"caption": upstream["caption"], "autoencoder": None}, str(workdir)
    )

    rows = samples(26)  # two new rows
    rows[3] = {
        **rows[3],
        "image": shape_png(COLOURS["red"], BACKGROUNDS["black"], 9),
    }  # an edited image
    grown = {"caption": caption_stage(workdir, rows), "autoencoder": None}
    encoded: list[str] = []
    real = encoding.encode_batch

    def counting(config, encoders, batch):
        encoded.extend(sample["id"] for sample in batch)
        return real(config, encoders, batch)

    monkeypatch.setattr(encoding, "encode_batch", counting)
    second = cache_latents(pretrained, grown, str(workdir))
    assert sorted(encoded) == ["s003", "s024", "s025"] and second["info"]["rows_computed"] == 3
    assert second["counts"]["encoded"] == first["counts"]["encoded"] + 2

    before, after = (CachedLatents(workdir, m) for m in (first, second))
    old = {before[i]["id"]: before[i] for i in range(len(before))}
    for i in range(len(after)):
        row = after[i]
        if row["id"] in old and row["id"] != "s003":  # reused: the very same tensors
            assert all(torch.equal(row[k], old[row["id"]][k]) for k in ("mean", "std", "text"))
    edited = next(after[i] for i in range(len(after)) if after[i]["id"] == "s003")
    assert not torch.equal(edited["mean"], old["s003"]["mean"])  # nothing stale


def test_encoding_one_image_at_a_time_makes_a_grown_output_byte_identical(
    setup, tmp_path, tiny_sd15
):
    """Batched kernels round differently with batch composition; one image per batch does not."""
    workdir, _, upstream, _ = setup
    config = pretrained_setup(setup, tmp_path, tiny_sd15)
    config.eval.held_out_fraction, config.latents.batch_size = 0.0, 1
    cache_latents(config, {"caption": upstream["caption"], "autoencoder": None}, str(workdir))
    rows = samples(26)
    rows[3] = {**rows[3], "image": shape_png(COLOURS["red"], BACKGROUNDS["black"], 9)}
    grown = cache_latents(
        config, {"caption": caption_stage(workdir, rows), "autoencoder": None}, str(workdir)
    )
    scratch = tmp_path / "scratch"
    fresh = cache_latents(
        config, {"caption": caption_stage(scratch, rows), "autoencoder": None}, str(scratch)
    )
    assert grown["info"]["rows_computed"] == 3 and fresh["info"]["rows_computed"] == 26
    assert grown["fingerprint"] == fresh["fingerprint"]


def test_channels_last_encodes_the_same_latents(setup, monkeypatch):
    """`latents.channels_last`: the VAE sees channels-last pixel batches; the cache holds the same
    latents as the default layout (within float tolerance)."""
    workdir, config, upstream, manifest = setup
    layouts: list[bool] = []
    encode = encoding.encode_images

    def spy(vae, pixels):
        layouts.append(pixels.is_contiguous(memory_format=torch.channels_last))
        return encode(vae, pixels)

    monkeypatch.setattr(encoding, "encode_images", spy)
    last = config.model_copy(deep=True)
    last.latents.channels_last = True
    other = cache_latents(last, upstream, str(workdir))
    assert layouts and all(layouts)
    a, b = CachedLatents(workdir, manifest), CachedLatents(workdir, other)
    assert len(a) == len(b)
    for i in range(len(a)):
        assert a[i]["id"] == b[i]["id"]
        for key in ("mean", "std", "mean_flip", "std_flip"):
            torch.testing.assert_close(b[i][key], a[i][key], rtol=1e-3, atol=1e-4)
