"""The class_images stage: generated once per base and class prompt (a second run reuses them, no
pipeline call), resumable per image (a killed build keeps its finished images and the resumed output
equals an uninterrupted one), read from a folder instead, and cached in the latents format (rows
checked against diffusers' VAE and transformers' CLIP text encoder run here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from fixtures.prior import count_pipeline_calls, prior_config
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from sdflow.errors import UserError
from sdflow.store.stageio import output_dir
from tasks.class_images import class_images_key, make_class_images

PROMPT = "a blue square"


@pytest.fixture(scope="module")
def generated(tiny_sd, tmp_path_factory):
    """One uninterrupted build of 3 class images in batches of 2, its pipeline calls counted."""
    base = tiny_sd["root"] / "base"
    config = prior_config(base, PROMPT, 3)
    workdir = tmp_path_factory.mktemp("class-images")
    with pytest.MonkeyPatch.context() as patch:
        calls = count_pipeline_calls(patch)
        manifest = make_class_images(config, {}, str(workdir))
    return config, workdir, manifest, calls


def test_a_second_run_with_the_same_base_and_prompt_reuses_the_images(generated, monkeypatch):
    config, workdir, first, calls = generated
    assert calls == [2, 1] and first["counts"] == {"class_images": 3, "generated": 3}
    other_data = {"caption": {"fingerprint": "other instance images"}}  # never in the key
    calls = count_pipeline_calls(monkeypatch)
    again = make_class_images(config, other_data, str(workdir))
    assert calls == [] and again["reused"] and again["fingerprint"] == first["fingerprint"]
    other_prompt = prior_config(config.model.pretrained, "a photo of a cat", 3)
    assert class_images_key(other_prompt, {}) != class_images_key(config, other_data)
    # encoded otherwise (no flipped latents): a new output, the same images copied, not generated
    unflipped = prior_config(config.model.pretrained, PROMPT, 3, "latents.flip=false")
    copied = make_class_images(unflipped, {}, str(workdir))
    assert calls == [] and copied["info"]["copied"] == 3 and copied["key"] != first["key"]
    images = [output_dir(workdir, m) / "images" for m in (first, copied)]
    assert [p.read_bytes() for p in sorted(images[0].iterdir())] == [
        p.read_bytes() for p in sorted(images[1].iterdir())
    ]


def test_a_killed_build_resumes_per_image(generated, tmp_path, monkeypatch):
    config, _, uninterrupted, _ = generated
    calls = count_pipeline_calls(monkeypatch)
    from sdflow.training import class_images

    real_generate = class_images.generate

    def killed_after_one_batch(pipe, jobs, run_config):
        for number, out in enumerate(real_generate(pipe, jobs, run_config)):
            if number == 1:
                raise RuntimeError("killed")
            yield out

    monkeypatch.setattr(class_images, "generate", killed_after_one_batch)
    with pytest.raises(RuntimeError, match="killed"):
        make_class_images(config, {}, str(tmp_path))
    partial = next((tmp_path / "stages" / "class_images").glob(".*.partial"))
    assert sorted(p.name for p in (partial / "images").iterdir()) == [
        "class-00000.png",
        "class-00001.png",
    ]
    monkeypatch.setattr(class_images, "generate", real_generate)
    calls.clear()
    resumed = make_class_images(config, {}, str(tmp_path))
    assert calls == [1]  # only the missing third image
    assert resumed["fingerprint"] == uninterrupted["fingerprint"]  # the same bytes


def test_class_rows_are_the_vae_and_text_encoding_of_the_images(generated, tiny_sd):
    config, workdir, manifest, _ = generated
    out = output_dir(workdir, manifest)
    tensors = load_file(str(out / manifest["shards"][0]))
    base = tiny_sd["root"] / "base"
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    ids = tokenizer([PROMPT], padding="max_length", max_length=tokenizer.model_max_length)
    with torch.no_grad():
        text = encoder(torch.tensor(ids.input_ids))[0]
        image = np.array(Image.open(out / "images" / "class-00002.png").convert("RGB"))
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
        mean = vae.encode(pixels).latent_dist.mean
    torch.testing.assert_close(tensors["text"][2:3], text, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tensors["mean"][2:3], mean, rtol=1e-4, atol=1e-5)


def test_class_images_from_a_folder(tiny_sd, tmp_path, monkeypatch):
    folder = tmp_path / "dogs"
    folder.mkdir()
    for name, color in (("b", (0, 0, 255)), ("a", (255, 0, 0)), ("c", (0, 255, 0))):
        Image.new("RGB", (32, 32), color).save(folder / f"{name}.png")
    base = tiny_sd["root"] / "base"
    directory = f"train.prior_preservation.class_images_dir={folder}"
    calls = count_pipeline_calls(monkeypatch)
    manifest = make_class_images(prior_config(base, PROMPT, 2, directory), {}, str(tmp_path))
    shard = output_dir(tmp_path, manifest) / manifest["shards"][0]
    from sdflow.training.latent_data import read_shard_ids

    assert read_shard_ids(shard) == ["a", "b"] and calls == []  # the first two by name
    with pytest.raises(UserError, match="holds 3 images .* num_class_images is 5"):
        make_class_images(prior_config(base, PROMPT, 5, directory), {}, str(tmp_path))
