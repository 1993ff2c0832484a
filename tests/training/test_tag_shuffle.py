"""Tag shuffling (`sdflow.training.tag_shuffle`): each step's caption is a permutation of its tags
with the first `keep_tokens` in place, encoded as the family's own pipeline encodes that caption
(every family: SD, SDXL's two encoders and pooled, SD3, Flux); drawn from the step's generator
after the other draws, so a resumed step draws the same and a run without it is unchanged."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from fixtures.training import make_latents, sd_scheduler

from sdflow.config import TrainConfig
from sdflow.models.families import TextEncoders, get_family
from sdflow.store.stageio import output_dir
from sdflow.training.latent_data import captions_path
from sdflow.training.objective import draw_inputs
from sdflow.training.schedules import CachedBatches, collate
from sdflow.training.tag_shuffle import (
    CaptionEncoder,
    ShuffledCaptions,
    shuffle_captions,
    shuffle_tags,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HEAD, TAIL = "sks", ["red hair", "smile", "outdoors"]
CAPTION = ", ".join([HEAD, *TAIL])
CANDIDATES = [", ".join([HEAD, *order]) for order in itertools.permutations(TAIL)]


def test_shuffle_keeps_the_first_tags_and_permutes_the_rest():
    generator = torch.Generator().manual_seed(0)
    seen = {shuffle_tags("a, b,, c , d, e", 2, generator) for _ in range(60)}
    assert all(s.startswith("a, b, ") for s in seen)
    assert all(sorted(s.split(", ")) == ["a", "b", "c", "d", "e"] for s in seen)
    assert len(seen) == 6  # all 3! orders of the tail appear
    assert shuffle_tags("no commas here", 0, generator) == "no commas here"


def sd_source(tmp_path, tiny_sd):
    """The fixture's latents cache with tag captions beside its shards, its SD encoder."""
    manifest = make_latents(tmp_path, tiny_sd, rows=(4, 3))
    for shard, rows in zip(manifest["shards"], (4, 3), strict=True):
        captions_path(output_dir(tmp_path, manifest) / shard).write_text(
            json.dumps([CAPTION] * rows)
        )
    text = TextEncoders([tiny_sd["tokenizer"]], [tiny_sd["text_encoder"]])
    cached = CachedBatches(str(tmp_path), manifest)
    return ShuffledCaptions(cached, CaptionEncoder(get_family("sd"), text, "text"))


def test_each_step_encodes_a_shuffled_caption_and_resume_draws_the_same(tmp_path, tiny_sd):
    source = sd_source(tmp_path, tiny_sd)
    batch = collate([source.dataset[i] for i in range(7)])
    tokenizer, encoder = tiny_sd["tokenizer"], tiny_sd["text_encoder"]
    with torch.no_grad():  # the candidates, encoded by transformers directly
        ids = tokenizer(CANDIDATES, padding="max_length", max_length=16, truncation=True)
        candidates = encoder(torch.tensor(ids.input_ids))[0]
    train = TrainConfig(caption_shuffle=True, keep_tokens=1)
    generator = torch.Generator().manual_seed(0)
    chosen = set()
    for _ in range(4):  # four steps of one run
        state = generator.get_state()
        inputs = draw_inputs(sd_scheduler(), source, batch, generator, train)
        for row in inputs.text:
            match = [torch.allclose(row, c, atol=1e-5) for c in candidates]
            assert sum(match) == 1  # exactly one order of the tags, the head in place
            chosen.add(match.index(True))
        resumed = torch.Generator().set_state(state)  # a resumed run restores this state
        again = draw_inputs(sd_scheduler(), source, batch, resumed, train)
        assert torch.equal(again.text, inputs.text)
        assert torch.equal(resumed.get_state(), generator.get_state())
    assert len(chosen) > 2  # the order changes per sample and step

    # the shuffle draws after everything else: flips, noise and timesteps are those of a run
    # without it; caption dropout still gives the cached empty prompt
    plain = draw_inputs(
        sd_scheduler(), source, batch, torch.Generator().manual_seed(0), TrainConfig()
    )
    first = draw_inputs(sd_scheduler(), source, batch, torch.Generator().manual_seed(0), train)
    assert torch.equal(plain.noise, first.noise) and torch.equal(plain.timesteps, first.timesteps)
    dropped = TrainConfig(caption_shuffle=True, caption_dropout=1.0)
    inputs = draw_inputs(sd_scheduler(), source, batch, torch.Generator().manual_seed(0), dropped)
    assert torch.equal(inputs.text, source.empty_prompt.expand_as(inputs.text))


def pipeline_encoding(name: str, root):
    """The family's text encoders from its tiny pipeline, and the pipeline's own encode_prompt
    -> (text, pooled)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline

    if name == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(root)
        text = TextEncoders(
            [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
        )

        def encode(caption):
            out = pipe.encode_prompt(caption, device="cpu", do_classifier_free_guidance=False)
            return out[0], out[2]
    elif name == "sd3":
        pipe = StableDiffusion3Pipeline.from_pretrained(root)
        text = TextEncoders(
            [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3],
            [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3],
            sequence_length=8,
        )

        def encode(caption):
            out = pipe.encode_prompt(
                caption, caption, caption, device="cpu", do_classifier_free_guidance=False,
                max_sequence_length=8,
            )  # fmt: skip
            return out[0], out[2]
    else:
        pipe = FluxPipeline.from_pretrained(root)
        text = TextEncoders(
            [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], 8
        )

        def encode(caption):
            out = pipe.encode_prompt(caption, caption, device="cpu", max_sequence_length=8)
            return out[0], out[1]

    return text, encode


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_every_family_encodes_the_shuffled_caption_with_its_pooled_projection(name, request):
    root = request.getfixturevalue(f"tiny_{name}")
    text, encode = pipeline_encoding(name, root)
    source = type("Source", (), {"encode_captions": CaptionEncoder(get_family(name), text, "text")})
    train = TrainConfig(caption_shuffle=True, keep_tokens=1)
    batch = shuffle_captions(
        source(), {"caption": [CAPTION]}, torch.Generator().manual_seed(1), train
    )
    assert batch["caption"][0] in CANDIDATES
    expected_text, expected_pooled = encode(batch["caption"][0])
    torch.testing.assert_close(batch["text"][0], expected_text[0].float())
    torch.testing.assert_close(batch["pooled"][0], expected_pooled[0].float())
