"""`train.text_encoder: lora` for SD3 and Flux on the tiny pipelines: LoRA on the CLIP encoder(s),
T5 frozen; the cache holds token ids; the export loads with the pipelines' own `load_lora_weights`
and changes their text encoders' output and the image; a crashed run resumes bitwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from fixtures.stages import caption_stage, resumed_after_crash, samples

from sdflow.errors import UserError
from sdflow.models.components import component_sources
from sdflow.models.families import family_of
from sdflow.profiles import load_profile
from sdflow.store.checkpoints import load_checkpoint, step_name
from tasks.latents import cache_latents
from tasks.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LENGTH = 24  # model.max_sequence_length (T5 tokens)
OPTIONS = ["train.mode=lora", "train.text_encoder=lora", "train.max_steps=4",
           "train.checkpoint_every=2", "train.batch_size=3", "train.lr=0.05",
           "train.text_encoder_lr=0.02", "train.caption_dropout=0.3", "train.lora_alpha=8",
           f"model.max_sequence_length={LENGTH}", "latents.shard_size=8"]  # fmt: skip


def text_config(pipeline: Path, *overrides: str):
    options = ["model.init=pretrained", f"model.pretrained={pipeline}", *OPTIONS, *overrides]
    return load_profile("tiny-test", options)


def trained_run(pipeline: Path, workdir: Path, *overrides: str) -> tuple:
    config = text_config(pipeline, *overrides)
    upstream = {"caption": caption_stage(workdir, samples(6)), "autoencoder": None}
    latents = cache_latents(config, upstream, str(workdir))
    upstream = {"latents": latents, "autoencoder": None, "caption": None}
    return config, upstream, latents, train(config, upstream, str(workdir))


def sharing_stages(source: Path, workdir: Path) -> str:
    """A fresh workdir whose latents and caption stages are `source`'s (workdir-relative paths)."""
    (workdir / "stages").mkdir(parents=True)
    for stage in ("latents", "caption"):
        (workdir / "stages" / stage).symlink_to(source / "stages" / stage)
    return str(workdir)


def trained_text_weights(workdir: Path, manifest: dict, step: int) -> dict:
    _, values = load_checkpoint(workdir / manifest["path"] / "checkpoints" / step_name(step))
    return values["text_encoder"]


def trained_away_from_zero(weights: dict) -> bool:
    """PEFT starts every lora_B at zero: a nonzero one trained."""
    ups = [value for name, value in weights.items() if "lora_B" in name]
    return bool(ups) and all(bool(value.abs().sum() > 0) for value in ups)


def t5_and_clip_states(pipe, **kwargs) -> tuple:
    with torch.no_grad():
        out = pipe.encode_prompt("a red square", device="cpu", max_sequence_length=LENGTH, **kwargs)
    return out


def generate(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red square", height=32, width=32, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0), max_sequence_length=LENGTH)  # fmt: skip
    return out.images[0]


def test_sd3_trains_both_clip_loras_resumes_bitwise_and_loads(tiny_sd3, tmp_path, monkeypatch):
    config, upstream, latents, straight = trained_run(tiny_sd3, tmp_path / "straight")
    assert latents["info"]["captions"] == "input_ids"
    last = trained_text_weights(tmp_path / "straight", straight, 4)
    assert last and all(n.startswith("encoders.") and "lora" in n for n in last)  # CLIPs only
    assert {n.split(".")[1] for n in last} == {"0", "1"}  # both CLIPs' adapters
    assert trained_away_from_zero(last)

    crashed = sharing_stages(tmp_path / "straight", tmp_path / "crashed")
    resumed = resumed_after_crash(monkeypatch, lambda: train(config, upstream, crashed))
    assert resumed["info"]["resumed_from_step"] == 2
    assert resumed["fingerprint"] == straight["fingerprint"]  # the same adapters, bitwise

    base = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.load_lora_weights(str(tmp_path / "straight" / straight["path"] / "lora"))
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        assert any("lora" in n for n, _ in encoder.named_parameters())
    assert not any("lora" in n for n, _ in pipe.text_encoder_3.named_parameters())
    kwargs = {"prompt_2": None, "prompt_3": None, "do_classifier_free_guidance": False}
    embeds, _, pooled, _ = t5_and_clip_states(pipe, **kwargs)
    base_embeds, _, base_pooled, _ = t5_and_clip_states(base, **kwargs)
    clip_tokens = pipe.tokenizer.model_max_length
    assert not torch.allclose(pooled, base_pooled, atol=1e-4)  # the CLIP adapters took effect
    assert not torch.allclose(embeds[:, :clip_tokens], base_embeds[:, :clip_tokens], atol=1e-4)
    torch.testing.assert_close(embeds[:, clip_tokens:], base_embeds[:, clip_tokens:])  # T5 frozen
    assert not np.allclose(generate(pipe), generate(base), atol=1e-3)


def test_flux_trains_its_clip_lora_with_shuffled_captions_and_loads(tiny_flux, tmp_path):
    options = ["train.mixed_precision=bf16", "train.caption_shuffle=true", "train.keep_tokens=1"]
    _, _, _, manifest = trained_run(tiny_flux, tmp_path, *options)
    last = trained_text_weights(tmp_path, manifest, 4)
    assert last and all(n.startswith("encoders.0.") and "lora" in n for n in last)
    assert trained_away_from_zero(last)
    base = FluxPipeline.from_pretrained(tiny_flux)
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    pipe.load_lora_weights(str(tmp_path / manifest["path"] / "lora"))
    assert any("lora" in n for n, _ in pipe.text_encoder.named_parameters())
    embeds, pooled, _ = t5_and_clip_states(pipe, prompt_2=None)
    base_embeds, base_pooled, _ = t5_and_clip_states(base, prompt_2=None)
    assert not torch.allclose(pooled, base_pooled, atol=1e-4)  # the CLIP adapter took effect
    torch.testing.assert_close(embeds, base_embeds)  # T5 frozen
    assert not np.allclose(generate(pipe), generate(base), atol=1e-3)


def test_a_fully_trained_flow_text_encoder_is_refused(tiny_flux):
    config = load_profile(
        "tiny-test",
        ["model.init=pretrained", f"model.pretrained={tiny_flux}", "train.text_encoder=full"],
    )
    with pytest.raises(UserError, match="train.text_encoder is 'full' but the model is FluxPipe"):
        family_of(config).check(config)


def test_the_trained_module_computes_what_the_pipeline_encodes(tiny_sd3):
    config = text_config(tiny_sd3)
    family = family_of(config)
    text = family.load_text(component_sources(config, {"autoencoder": None}, "."), config)
    module = family.trainable_text(text.encoders)
    prompts = ["a red square", "two blue circles"]
    with torch.no_grad():
        states, pooled = module(family.tokenize(text, prompts))
    reference = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    embeds, _, ref_pooled, _ = reference.encode_prompt(
        prompts, None, None, device="cpu", do_classifier_free_guidance=False,
        max_sequence_length=LENGTH,
    )  # fmt: skip
    torch.testing.assert_close(states, embeds)
    torch.testing.assert_close(pooled, ref_pooled)
