"""Building, training, saving and loading the tiny Stable Diffusion components of tiny-test."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from sdflow.errors import UserError
from sdflow.models import components as models
from sdflow.models import files, schedulers
from sdflow.profiles import load_profile


@pytest.fixture(scope="module")
def config():
    return load_profile("tiny-test")


@pytest.fixture(scope="module")
def pipeline_dir(tiny_sd) -> Path:
    """A complete tiny pipeline saved with save_pipeline (DDPM): what a 'pretrained' model looks
    like."""
    return tiny_sd["root"] / "base"


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------ scratch


def test_build_is_seeded_and_leaves_global_rng_alone(config):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = models.build_vae(config.model)
    assert torch.equal(torch.rand(3), expected)
    assert same_weights(first, models.build_vae(config.model))
    other_seed = config.model.model_copy(update={"seed": 1})
    assert not same_weights(first, models.build_vae(other_seed))
    assert same_weights(models.build_unet(config.model), models.build_unet(config.model))
    text = models.build_text_encoder(config.model, 100)
    assert same_weights(text, models.build_text_encoder(config.model, 100))
    assert text.config.vocab_size == 100
    assert text.config.max_position_embeddings >= config.model.max_token_length


def test_build_unet_rejects_cross_attention_mismatch(config):
    unet = {**config.model.unet, "cross_attention_dim": 64}
    with pytest.raises(UserError, match="cross_attention_dim .64. must equal .* hidden size .*32"):
        models.build_unet(config.model.model_copy(update={"unet": unet}))


def test_build_rejects_unknown_config_keys(config):
    vae = {**config.model.vae_config, "latent_chanels": 4}
    with pytest.raises(UserError, match="model.vae_config .*latent_chanels"):
        models.build_vae(config.model.model_copy(update={"vae_config": vae}))
    text = {**config.model.text_encoder, "hiden_size": 32}
    with pytest.raises(UserError, match="model.text_encoder .*hiden_size"):
        models.build_text_encoder(config.model.model_copy(update={"text_encoder": text}), 64)


# ------------------------------------------------------------------------------------ save and load


def test_saved_pipeline_loads_and_generates(pipeline_dir):
    for sub in ("unet", "vae", "text_encoder"):
        files = [p.name for p in (pipeline_dir / sub).iterdir()]
        assert any(f.endswith(".safetensors") for f in files)
        assert not any(f.endswith((".bin", ".pt", ".ckpt")) for f in files)
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    image = pipe(
        "a red square", num_inference_steps=2, height=32, width=32, generator=generator
    ).images[0]
    assert image.size == (32, 32)
    assert np.asarray(image).std() > 0  # a real decoded image, not a constant


def test_encode_prompts_matches_the_pipeline(pipeline_dir):
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    prompts = ["a red square", "two yellow triangles"]
    with torch.no_grad():
        ours = models.encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)
        theirs = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    assert ours.shape == (2, 16, 32)
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours[0], ours[1])  # a random encoder still tells captions apart


def test_load_component_from_local_dir(config, pipeline_dir):
    model = config.model.model_copy(update={"init": "pretrained", "pretrained": str(pipeline_dir)})
    unet = models.load_component(str(pipeline_dir), "unet", UNet2DConditionModel, model)
    assert same_weights(unet, models.build_unet(config.model))
    vae = models.load_component(str(pipeline_dir), "vae", AutoencoderKL, model, torch.float16)
    assert next(vae.parameters()).dtype == torch.float16
    text = models.load_component(str(pipeline_dir), "text_encoder", CLIPTextModel, model)
    assert isinstance(text, CLIPTextModel)
    tokenizer = models.load_component(str(pipeline_dir), "tokenizer", CLIPTokenizer, model)
    assert tokenizer.model_max_length == config.model.max_token_length


def test_load_component_names_the_config_key_of_a_missing_dir(config, pipeline_dir, tmp_path):
    missing = str(tmp_path / "nowhere")
    model = config.model.model_copy(update={"init": "pretrained", "pretrained": missing})
    with pytest.raises(UserError, match=f"model.pretrained points to {missing}/unet"):
        models.load_component(missing, "unet", UNet2DConditionModel, model)
    model = config.model.model_copy(update={"vae": str(pipeline_dir)})
    with pytest.raises(UserError, match=f"model.vae points to .*/{pipeline_dir.name}/no_such_vae"):
        models.load_component(str(pipeline_dir), "no_such_vae", AutoencoderKL, model)


def test_component_sources(config, pipeline_dir, tmp_path, monkeypatch):
    done = {"path": "stages/x/k", "fingerprint": "f", "files": {"vae": "vae"}}
    latents = {"path": "stages/l/k", "fingerprint": "g"}
    latents["files"] = {"text_encoder": "text_encoder", "tokenizer": "tokenizer"}
    src = models.component_sources(config, {"autoencoder": done, "latents": latents}, str(tmp_path))
    assert (src.vae, src.vae_subfolder) == (str(tmp_path / "stages/x/k/vae"), None)
    assert src.text_encoder == str(tmp_path / "stages/l/k/text_encoder")
    assert src.tokenizer == str(tmp_path / "stages/l/k/tokenizer")
    assert (src.unet, src.scheduler) == (None, None)
    with pytest.raises(UserError, match="No VAE"):
        models.component_sources(config, {"autoencoder": None}, str(tmp_path))
    pretrained = config.model_copy(
        update={
            "model": config.model.model_copy(update={"init": "pretrained", "pretrained": "a/b"})
        }
    )
    src = models.component_sources(pretrained, {}, str(tmp_path))
    assert (src.vae, src.vae_subfolder, src.unet, src.unet_subfolder) == (
        "a/b",
        "vae",
        "a/b",
        "unet",
    )
    assert (src.text_encoder_subfolder, src.tokenizer_subfolder) == ("text_encoder", "tokenizer")
    # model.vae given as a whole pipeline directory: its vae/ folder is used
    own_vae = config.model_copy(
        update={"model": config.model.model_copy(update={"vae": str(pipeline_dir)})}
    )
    src = models.component_sources(own_vae, {}, str(tmp_path))
    assert (src.vae, src.vae_subfolder) == (str(pipeline_dir), "vae")
    # a relative directory is made absolute: it means the same from any working directory
    monkeypatch.chdir(pipeline_dir.parent)
    relative = own_vae.model_copy(
        update={"model": own_vae.model.model_copy(update={"vae": f"./{pipeline_dir.name}/vae"})}
    )
    src = models.component_sources(relative, {}, str(tmp_path))
    assert (src.vae, src.vae_subfolder) == (str(pipeline_dir / "vae"), None)


def test_noise_scheduler_overrides_prediction_type(config, pipeline_dir):
    train = config.train.model_copy(update={"prediction_type": "v_prediction"})
    model = config.model.model_copy(update={"init": "pretrained", "pretrained": str(pipeline_dir)})
    run = config.model_copy(update={"train": train, "model": model})
    scheduler = schedulers.noise_scheduler(run, models.component_sources(run, {}, "."))
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.num_train_timesteps == 1000


def test_prediction_type_unset_is_the_base_models_and_a_strange_scheduler_is_named(
    config, pipeline_dir, tmp_path
):
    model = config.model.model_copy(update={"init": "pretrained", "pretrained": str(pipeline_dir)})
    run = config.model_copy(update={"model": model})
    sources = models.component_sources(run, {}, ".")
    assert run.train.prediction_type is None
    trained = schedulers.noise_scheduler(run, sources)
    assert trained.config.prediction_type == "epsilon"  # what pipeline_dir's scheduler says
    exported = schedulers.inference_scheduler(run, sources, trained)
    assert type(exported).__name__ == "DDPMScheduler"  # the base's own class, kept
    broken = tmp_path / "broken"
    (broken / "scheduler").mkdir(parents=True)
    saved = json.loads((pipeline_dir / "scheduler" / "scheduler_config.json").read_text())
    saved["_class_name"] = "AutoencoderKL"
    (broken / "scheduler" / "scheduler_config.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match="'AutoencoderKL' is not a diffusers scheduler"):
        schedulers.inference_scheduler(
            run, models.ComponentSources(*[None] * 8, str(broken)), trained
        )


def test_image_to_tensor_crops_and_scales():
    image = Image.new("RGB", (64, 32), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 8, 32))  # a black stripe on the left, cropped away
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    pixels = models.image_to_tensor(buffer.getvalue(), 16)
    assert pixels.shape == (3, 16, 16)
    assert pixels.dtype == torch.float32
    torch.testing.assert_close(pixels, torch.ones(3, 16, 16))
    buffer = io.BytesIO()
    Image.new("L", (16, 16), 0).save(buffer, format="PNG")
    torch.testing.assert_close(
        models.image_to_tensor(buffer.getvalue(), 16), -torch.ones(3, 16, 16)
    )


def test_weights_hash_follows_content(pipeline_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(pipeline_dir, copy)
    before = files.weights_hash(str(copy), "vae")
    assert before == files.weights_hash(str(pipeline_dir), "vae")
    config = json.loads((copy / "vae" / "config.json").read_text())
    config["scaling_factor"] = 0.5
    (copy / "vae" / "config.json").write_text(json.dumps(config))
    assert files.weights_hash(str(copy), "vae") != before
    commit = "c" * 40  # hub names: see tests/test_hub.py
    assert files.weights_hash("org/model", "vae", commit) == f"hub:org/model@{commit}/vae"
    with pytest.raises(UserError, match="does not exist"):
        files.weights_hash(str(tmp_path / "nowhere"), None)


def test_saved_components_do_not_record_where_they_were_loaded_from(pipeline_dir, tmp_path):
    import shutil

    from diffusers import AutoencoderKL

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(pipeline_dir, elsewhere)
    saved = []
    for source in (pipeline_dir, elsewhere):  # the same weights in two workdirs
        vae = AutoencoderKL.from_pretrained(source / "vae")
        out = tmp_path / f"out-{len(saved)}"
        files.save_component(vae, out)
        saved.append((out / "config.json").read_bytes())
    assert saved[0] == saved[1]
    assert "_name_or_path" not in json.loads(saved[0])


def test_canonical_safetensors_orders_the_header_and_keeps_the_tensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(5, dtype=torch.float16)}
    config = {"r": 4, "target_modules": ["to_v", "to_q", "to_k"], "lora_alpha": 8}
    written = []
    for order in (["format", "adapter"], ["adapter", "format"]):  # metadata in either order
        values = {"format": "pt", "adapter": json.dumps(config)}
        path = tmp_path / f"{order[0]}.safetensors"
        save_file(tensors, path, metadata={k: values[k] for k in order})
        files.canonical_safetensors(path)
        written.append(path.read_bytes())
    assert written[0] == written[1]
    loaded = load_file(tmp_path / "format.safetensors")
    assert all(
        torch.equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype for k in tensors
    )
    with safe_open(tmp_path / "format.safetensors", "pt") as handle:
        adapter = json.loads(handle.metadata()["adapter"])
    assert adapter == {**config, "target_modules": ["to_k", "to_q", "to_v"]}
