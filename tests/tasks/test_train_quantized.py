"""A LoRA trained on the tiny Flux with its transformer quantized (`model.quantize: int8`, torchao on
this CPU) and T5 quantized while caching (`model.quantize_text_encoder`): the train stage validates
on the quantized base, resumes bitwise after a crash, and its exported adapter loads onto the unquantized base with diffusers'
`load_lora_weights` and changes its images."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from fixtures.stages import caption_stage, crash_at_checkpoint, samples

import sdflow.models.components as components
import sdflow.models.families.flow as flow
import sdflow.models.trainable as trainable
from sdflow.profiles import load_profile
from tasks.latents import cache_latents
from tasks.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LENGTH = 16
OPTIONS = [
    "model.init=pretrained", "model.quantize=int8", "model.quantize_text_encoder=true",
    f"model.max_sequence_length={LENGTH}", "eval.held_out_fraction=0.25", "latents.shard_size=8",
    "train.mode=lora", "train.mixed_precision=bf16", "train.gradient_checkpointing=true",
    "train.lora_targets=[to_q,to_k,to_v,to_out.0,proj_mlp]", "train.lr=0.05",
    "train.max_steps=4", "train.checkpoint_every=2", "train.batch_size=3", "train.validate_every=2",
    "train.validation_images=1", "train.validation_inference_steps=2",
]  # fmt: skip


def test_a_lora_on_an_int8_flux_resumes_bitwise_and_loads_on_the_full_base(
    tiny_flux, tmp_path, monkeypatch
):
    config = load_profile("tiny-test", [f"model.pretrained={tiny_flux}", *OPTIONS])
    loaded = []  # what reached from_pretrained: the transformer's and T5's quantization configs
    real = components.load_component
    for module in (trainable, flow):
        monkeypatch.setattr(module, "load_component", lambda *a: loaded.append(a[1:2] + a[5:]) or real(*a))  # fmt: skip
    workdir = str(tmp_path)
    upstream = {"caption": caption_stage(tmp_path, samples(8)), "autoencoder": None}
    upstream["latents"] = cache_latents(config, upstream, workdir)
    undo = crash_at_checkpoint(monkeypatch, 4)
    with pytest.raises(OSError):
        train(config, upstream, workdir)
    undo()
    resumed = train(config, upstream, workdir)
    assert resumed["info"]["resumed_from_step"] == 2
    quantized = {part: type(q[0]).__name__ for part, *q in loaded if q and q[0] is not None}
    assert quantized == {"text_encoder_2": "TorchAoConfig", "transformer": "TorchAoConfig"}
    shutil.move(tmp_path / "stages" / "train", tmp_path / "resumed")  # the same run, uninterrupted
    straight = train(config, upstream, workdir)
    assert straight["fingerprint"] == resumed["fingerprint"]  # the same adapter, bitwise
    assert len(straight["info"]["validation"]["curve"]) == 2  # validated on the quantized base

    def generate(pipe):
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a red square", height=32, width=32, num_inference_steps=2, output_type="np",
                   generator=torch.Generator().manual_seed(0), max_sequence_length=LENGTH)  # fmt: skip
        return out.images[0]

    base = generate(FluxPipeline.from_pretrained(tiny_flux))
    pipe = FluxPipeline.from_pretrained(tiny_flux)  # unquantized, float32
    pipe.load_lora_weights(str(tmp_path / straight["path"] / "lora"))
    assert not np.allclose(generate(pipe), base, atol=1e-3)
