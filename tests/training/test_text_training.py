"""Training the text encoder (`train.text_encoder: lora | full`): the refused combinations, what the
exported model's prompt embeddings are, and the cache a trained encoder needs."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from fixtures.pipelines import CAPTIONS
from fixtures.training import (
    make_latents,
    pretrained_config,
    run_train,
    scratch_config,
    stage_path,
    unet_inputs,
)
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file
from transformers import CLIPTextModel

from sdflow.errors import UserError
from sdflow.profiles import ConfigError
from sdflow.store.checkpoints import load_checkpoint, step_name
from tasks.train import train

PROMPT = "two red circles"
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["train.text_encoder=full"], "model.init is 'scratch'"),
        (["train.text_encoder=lora"], "model.init is 'scratch'"),
    ],
)
def test_a_scratch_run_refuses_to_train_its_text_encoder(tiny_sd, overrides, named):
    with pytest.raises(ConfigError, match=named) as error:
        scratch_config(tiny_sd, *overrides)
    assert "train.text_encoder is" in str(error.value) and "allowed with scratch: 'frozen'" in str(
        error.value
    )


@pytest.mark.parametrize(
    ("overrides", "allowed"),
    [
        (["train.mode=lora", "train.text_encoder=full"], "'frozen' or 'lora'"),
        (["train.text_encoder=lora"], "'frozen' or 'full'"),  # mode full
        (["train.text_encoder=full", "train.cache_latents=false"], "cache_latents"),
    ],
)
def test_the_text_encoder_follows_the_unet_mode_and_needs_the_cache(tiny_sd, overrides, allowed):
    with pytest.raises(ConfigError, match="train.text_encoder is") as error:
        pretrained_config(tiny_sd, *overrides)
    assert allowed in str(error.value)


def test_a_trained_encoder_refuses_a_cache_of_embeddings(tmp_path, tiny_sd):
    config = pretrained_config(tiny_sd, "train.text_encoder=full")
    upstream = {"latents": make_latents(tmp_path, tiny_sd), "autoencoder": None, "caption": None}
    with pytest.raises(UserError, match="train.text_encoder"):
        train(config, upstream, str(tmp_path))


def prompt_embeddings(pipe: StableDiffusionPipeline) -> torch.Tensor:
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
    return embeds


def rebuilt_encoder(tiny_sd: dict, mode: str, trained: dict) -> CLIPTextModel:
    """The trained encoder rebuilt by hand: the base's, its adapter (r 2, alpha 8) for lora, and
    the checkpoint's trained weights."""
    encoder = CLIPTextModel.from_pretrained(tiny_sd["root"] / "base" / "text_encoder")
    if mode == "lora":
        lora = LoraConfig(r=2, lora_alpha=8, target_modules=TEXT_TARGETS)
        inject_adapter_in_model(lora, encoder, adapter_name="default")
    result = encoder.load_state_dict(trained, strict=False)
    assert not result.unexpected_keys
    if mode == "full":
        assert not result.missing_keys  # every weight trained and checkpointed
    else:
        assert not [k for k in result.missing_keys if "lora" in k]
    return encoder.eval()


@pytest.mark.parametrize("mode", ["frozen", "full", "lora"])
def test_the_exported_text_encoder_is_the_trained_one(tmp_path, tiny_sd, mode):
    unet_mode = "lora" if mode == "lora" else "full"
    config = pretrained_config(
        tiny_sd,
        f"train.mode={unet_mode}",
        f"train.text_encoder={mode}",
        "train.lr=0.01",
        "train.text_encoder_lr=0.02",
        "train.lora_rank=2",
        "train.lora_alpha=8",
        "train.keep_optimizer_state=true",
    )
    manifest, _ = run_train(config, tmp_path, tiny_sd)
    out = stage_path(tmp_path, manifest)
    assert manifest["info"]["text_encoder"] == mode
    _, state = load_checkpoint(out / "checkpoints" / step_name(4))
    base = StableDiffusionPipeline.from_pretrained(tiny_sd["root"] / "base", safety_checker=None)
    before = prompt_embeddings(base)
    if mode == "lora":
        pipe = base
        inputs = unet_inputs(pipe.unet)
        with torch.no_grad():
            unet_before = pipe.unet(*inputs).sample
        pipe.load_lora_weights(out / "lora")  # one call: the UNet's and the text encoder's adapter
        with torch.no_grad():
            assert (pipe.unet(*inputs).sample - unet_before).abs().max() > 1e-4
        lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
        assert sum(v.numel() for v in lora.values()) == manifest["counts"]["trainable_params"]
    else:
        pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline", safety_checker=None)
    after = prompt_embeddings(pipe)
    if mode == "frozen":
        assert "text_encoder" not in state
        assert torch.equal(after, before)
        assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [0.01]
        return
    encoder = rebuilt_encoder(tiny_sd, mode, state["text_encoder"])
    ids = base.tokenizer(PROMPT, padding="max_length", max_length=16, truncation=True)
    with torch.no_grad():
        expected = encoder(torch.tensor([ids.input_ids]))[0]
    assert (after - before).abs().max() > 1e-4  # training moved the text side
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-4)
    # two parameter groups: the UNet at train.lr, the text encoder at train.text_encoder_lr
    groups = state["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [0.01, 0.02]
    assert len(groups[1]["params"]) == len(state["text_encoder"])


def test_the_text_encoder_runs_under_the_unets_autocast(tmp_path, tiny_sd, monkeypatch):
    import sdflow.training.loop as training

    seen: list[torch.dtype] = []
    real = training.build_trainable_text_encoder

    def with_hook(*args, **kwargs):
        encoder = real(*args, **kwargs)
        attention = next(m for n, m in encoder.named_modules() if n.endswith("q_proj"))
        attention.register_forward_hook(lambda module, inputs, out: seen.append(out.dtype))
        return encoder

    monkeypatch.setattr(training, "build_trainable_text_encoder", with_hook)
    config = pretrained_config(
        tiny_sd, "train.text_encoder=full", "train.mixed_precision=bf16", "train.max_steps=2"
    )
    manifest, _ = run_train(config, tmp_path, tiny_sd)
    assert manifest["counts"]["steps"] == 2
    # the training steps ran it in bf16 (fp32 weights); the export rebuilt it once more, in fp32
    assert seen[:2] == [torch.bfloat16, torch.bfloat16] and seen[2:] == []


def test_caption_dropout_swaps_in_the_empty_prompts_token_ids(tmp_path, tiny_sd):
    from sdflow.config import TrainConfig
    from sdflow.training.objective import draw_inputs
    from sdflow.training.schedules import CachedBatches, collate

    manifest = make_latents(tmp_path, tiny_sd, tokens=True)
    source = CachedBatches(str(tmp_path), manifest, "input_ids")
    batch = collate([source.dataset[i] for i in range(len(source.dataset))])
    scheduler = DDPMScheduler()
    train = TrainConfig(caption_dropout=0.5)
    inputs = draw_inputs(scheduler, source, batch, torch.Generator().manual_seed(1), train)
    tokenizer = tiny_sd["tokenizer"]

    def ids(caption: str) -> list[int]:
        return tokenizer(caption, padding="max_length", max_length=16).input_ids

    captions = {f"s{i}-{j}": CAPTIONS[(i + j) % 4] for i, n in enumerate((7, 5)) for j in range(n)}
    assert 0 < int(inputs.drop.sum()) < len(batch["id"])
    for row, sample_id, dropped in zip(inputs.text, batch["id"], inputs.drop, strict=True):
        assert row.tolist() == (ids("") if dropped else ids(captions[sample_id]))
