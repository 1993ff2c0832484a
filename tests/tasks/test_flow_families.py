"""SD3 and Flux through the latents stage on the tiny pipelines (`tiny_sd3`, `tiny_flux`): the family
comes from model_index.json, the cached caption states equal the pipelines' own `encode_prompt`
(empty prompt included), T5's length is the configured one, bad settings are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from fixtures.stages import caption_stage, crash_at_checkpoint, samples

from sdflow.config import RunConfig
from sdflow.errors import UserError
from sdflow.models.families import family_of
from sdflow.profiles import load_profile
from sdflow.training.latent_data import CachedLatents, load_empty_prompts
from tasks.evaluate import evaluate
from tasks.latents import cache_latents
from tasks.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LENGTH = 24  # model.max_sequence_length of these runs (the pipelines' defaults are 256 and 512)


def flow_config(pipeline: Path, *overrides: str):
    options = ["model.init=pretrained", f"model.pretrained={pipeline}", *overrides]
    return load_profile("tiny-test", options)


def cached(pipeline: Path, workdir: Path, *overrides: str):
    config = flow_config(pipeline, f"model.max_sequence_length={LENGTH}", "eval.held_out_fraction=0.25",
                         "latents.shard_size=8", *overrides)  # fmt: skip
    upstream = {"caption": caption_stage(workdir, samples(8)), "autoencoder": None}
    return workdir, config, upstream, cache_latents(config, upstream, str(workdir))


@pytest.fixture(scope="module")
def sd3_latents(tiny_sd3, tmp_path_factory):
    return cached(tiny_sd3, tmp_path_factory.mktemp("sd3-work"))


@pytest.fixture(scope="module")
def flux_latents(tiny_flux, tmp_path_factory):
    return cached(tiny_flux, tmp_path_factory.mktemp("flux-work"), "train.mixed_precision=bf16")


def test_families_come_from_model_index(tiny_sd3, tiny_flux):
    assert family_of(flow_config(tiny_sd3)).name == "sd3"
    assert family_of(flow_config(tiny_flux)).name == "flux"
    with pytest.raises(UserError, match="model.family is 'sd3' but .* is a 'flux' pipeline"):
        family_of(flow_config(tiny_flux, "model.family=sd3"))


def rows_and_captions(latents):
    workdir, _, _, manifest = latents
    data = CachedLatents(workdir, manifest)
    captions = {s["id"]: s["caption"] for s in samples(8)}
    return [(data[i], captions[data[i]["id"]]) for i in range(3)], load_empty_prompts(
        workdir, manifest
    )


def test_sd3_cache_equals_the_pipelines_encode_prompt(sd3_latents, tiny_sd3):
    reference = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    rows, empty = rows_and_captions(sd3_latents)
    for row, caption in [*rows, ({"text": empty["text"], "pooled": empty["pooled"]}, "")]:
        text, _, pooled, _ = reference.encode_prompt(
            caption, caption, caption, device="cpu", do_classifier_free_guidance=False,
            max_sequence_length=LENGTH,
        )  # fmt: skip
        assert row["text"].shape == (16 + LENGTH, 48)  # 16 CLIP tokens padded to T5 width, T5 ones
        torch.testing.assert_close(row["text"], text[0])
        torch.testing.assert_close(row["pooled"], pooled[0])
    assert sd3_latents[3]["info"]["shift_factor"] == pytest.approx(0.0609)


def test_flux_cache_equals_the_pipelines_encode_prompt_in_bf16(flux_latents, tiny_flux):
    reference = FluxPipeline.from_pretrained(tiny_flux)
    rows, empty = rows_and_captions(flux_latents)
    for row, caption in [*rows, ({"text": empty["text"], "pooled": empty["pooled"]}, "")]:
        text, pooled, _ = reference.encode_prompt(
            caption, caption, device="cpu", max_sequence_length=LENGTH
        )
        assert row["text"].dtype == torch.bfloat16  # T5's states in the training precision
        torch.testing.assert_close(row["text"], text[0].to(torch.bfloat16))  # bf16 tolerance
        torch.testing.assert_close(row["pooled"], pooled[0])


def test_bad_flow_settings_are_refused_before_any_work(tiny_sd3, tiny_flux, tmp_path):
    upstream = {"caption": caption_stage(tmp_path, samples(4)), "autoencoder": None}
    cases = [
        # the tiny T5 tokenizer takes at most 64 tokens (T5-XXL's, 512)
        (tiny_flux, "model.max_sequence_length=65", "model.max_sequence_length is 65 but the T5"),
        (tiny_sd3, "train.snr_gamma=5.0", "train.snr_gamma is 5.0 but the model is StableDiff"),
        (tiny_flux, "train.prediction_type=v_prediction", "predicts the flow"),
        # 4 px latent steps: a 36 px side is 9 latents, which 2x2 patches cannot cover
        (
            tiny_sd3,
            "download.resolution=36",
            r"download.resolution gives image sizes \[\(36, 36\)\] that",
        ),
    ]
    for pipeline, option, message in cases:
        with pytest.raises(UserError, match=message):
            cache_latents(flow_config(pipeline, option), upstream, str(tmp_path))
    assert not list((tmp_path / "stages").glob("latents/*/MANIFEST.json"))  # nothing finished
    sd = load_profile("tiny-test", ["train.flow.weighting=cosmap"])  # a DDPM family: a mismatch
    with pytest.raises(UserError, match="train.flow.weighting is set but the model is Stable Diff"):
        family_of(sd).check(sd)
    plain = RunConfig.model_validate_json(load_profile("tiny-test").model_dump_json())
    family_of(plain).check(plain)  # read back (a worker process's config): defaults are no mismatch


# ------------------------------------------------------------------------------------------ train

TRAIN = ["train.max_steps=4", "train.checkpoint_every=2", "train.batch_size=3", "train.log_every=1"]
TRANSFORMER_LORA = "train.lora_targets=[to_q,to_k,to_v,to_out.0,add_q_proj,ff.net.2]"


def workdir_with(latents_workdir: Path, workdir: Path) -> str:
    """A fresh workdir that sees the fixture's latents stage (stage paths are workdir-relative)."""
    (workdir / "stages").mkdir(parents=True)
    for stage in ("latents", "caption"):
        (workdir / "stages" / stage).symlink_to(latents_workdir / "stages" / stage)
    return str(workdir)


def crashed_and_resumed(config, upstream, root: Path, workdir: Path, monkeypatch) -> dict:
    """The train stage killed at its step-4 checkpoint write, then run again: resumes at step 2."""
    undo = crash_at_checkpoint(monkeypatch, 4)
    with pytest.raises(OSError):
        train(config, upstream, workdir_with(root, workdir))
    undo()
    resumed = train(config, upstream, str(workdir))
    assert resumed["info"]["resumed_from_step"] == 2
    return resumed


def generate(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red square", height=32, width=32, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0), max_sequence_length=LENGTH, **kwargs)  # fmt: skip
    return out.images[0]


def test_sd3_lora_with_ema_resumes_exactly_and_loads(sd3_latents, tiny_sd3, tmp_path, monkeypatch):
    root, _, _, latents = sd3_latents
    options = ["train.mode=lora", "train.ema=true", "train.lr=0.05", "train.caption_dropout=0.3",
               "train.flow.weighting=cosmap", "train.gradient_checkpointing=true", TRANSFORMER_LORA,
               f"model.max_sequence_length={LENGTH}", "train.lora_alpha=8"]  # fmt: skip
    config = flow_config(tiny_sd3, *TRAIN, *options)
    upstream = {"latents": latents, "autoencoder": None, "caption": None}
    straight = train(config, upstream, workdir_with(root, tmp_path / "straight"))
    resumed = crashed_and_resumed(config, upstream, root, tmp_path / "crashed", monkeypatch)
    assert resumed["fingerprint"] == straight["fingerprint"]  # the same adapter, bitwise
    assert resumed["info"]["prediction_type"] == "flow"

    base = generate(StableDiffusion3Pipeline.from_pretrained(tiny_sd3))
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.load_lora_weights(str(tmp_path / "straight" / straight["path"] / "lora"))
    assert not np.allclose(generate(pipe), base, atol=1e-3)  # the adapter took effect
    assert any("ff.net.2" in n for n, _ in pipe.transformer.named_parameters() if "lora" in n)


def test_flux_full_finetune_with_validation_resumes_exactly_and_exports_a_pipeline(
    flux_latents, tiny_flux, tmp_path, monkeypatch
):
    root, _, stages, latents = flux_latents
    caption = stages["caption"]
    options = ["train.ema=true", "train.ema_decay=0.5", "train.validate_every=2",
               "train.validation_images=1", "train.validation_inference_steps=2",
               "train.guidance_scale=3.5", "train.mixed_precision=bf16",
               f"model.max_sequence_length={LENGTH}", "train.lr=0.01"]  # fmt: skip
    config = flow_config(tiny_flux, *TRAIN, *options, "eval.held_out_fraction=0.25")
    upstream = {"latents": latents, "autoencoder": None, "caption": None}
    manifest = train(config, upstream, workdir_with(root, tmp_path))
    resumed = crashed_and_resumed(config, upstream, root, tmp_path / "crashed", monkeypatch)
    assert resumed["fingerprint"] == manifest["fingerprint"]  # the same weights, bitwise
    out = tmp_path / manifest["path"]
    validation = manifest["info"]["validation"]
    assert len(validation["curve"]) == 2 and (out / validation["grid"]).is_file()
    pipe = FluxPipeline.from_pretrained(out / "pipeline")
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.scheduler.config.use_dynamic_shifting  # the base's own, as it was
    reference = FluxPipeline.from_pretrained(tiny_flux)
    evaluated = evaluate(config, {**upstream, "train": manifest, "caption": caption}, str(tmp_path))
    scores = evaluated["info"]
    assert scores["trained"]["fid"] != scores["baseline"]["fid"]  # sampled, and not the base
    assert not np.allclose(
        generate(pipe, guidance_scale=3.5), generate(reference, guidance_scale=3.5), atol=1e-3
    )
