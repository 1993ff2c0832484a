"""BlipCaptioner: BLIP and BLIP-2 from local directories, batched, with the generation settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from sdflow.config import CaptionConfig
from sdflow.data.captioners import select_device, select_dtype
from sdflow.data.captioners.blip import BlipCaptioner
from sdflow.errors import UserError


def blip(model: Path, **settings) -> BlipCaptioner:
    return BlipCaptioner(CaptionConfig(backend="blip", model=str(model), **settings))


def test_batched_captions_equal_captions_one_at_a_time(
    tiny_blip: Path, color_images: list, caption_words: list[str], no_network: list
) -> None:
    captioner = blip(tiny_blip, max_new_tokens=5)
    batched = captioner.caption(color_images, [None] * 6)
    assert batched == [captioner.caption([image], [None])[0] for image in color_images]
    assert len(set(batched)) > 1  # the captions depend on the image
    for caption in batched:
        words = caption.split(" ")
        assert len(words) == 5 and set(words) <= set(caption_words)
    assert captioner.model.dtype == torch.float32 and no_network == []


def test_prompt_beams_and_length(tiny_blip: Path, color_images: list) -> None:
    captioner = blip(tiny_blip, prompt="a photograph of", num_beams=3, max_new_tokens=2)
    captions = captioner.caption(color_images[:2], [None, None])
    assert all(c.startswith("a photograph of ") and len(c.split(" ")) <= 5 for c in captions)
    greedy = blip(tiny_blip, prompt="a photograph of", max_new_tokens=2)
    assert all(
        c.startswith("a photograph of ") for c in greedy.caption(color_images[:2], [None] * 2)
    )
    assert blip(tiny_blip).caption([], []) == []


def test_blip2_is_chosen_by_its_config(
    tiny_blip2: Path, color_images: list, caption_words: list[str], no_network: list
) -> None:
    captioner = blip(tiny_blip2, prompt="a photograph of", max_new_tokens=3)
    assert type(captioner.model).__name__ == "Blip2ForConditionalGeneration"
    for caption in captioner.caption(color_images[:3], [None] * 3):
        assert caption.startswith("a photograph of") and set(caption.split(" ")) <= set(
            caption_words
        )
    assert no_network == []


def test_weights_load_in_the_configured_dtype(tiny_blip: Path) -> None:
    assert blip(tiny_blip, dtype="bfloat16").model.dtype == torch.bfloat16
    cpu = torch.device("cpu")
    assert select_dtype("auto", cpu) == torch.float32
    assert select_dtype("auto", torch.device("cuda")) == torch.float16
    assert select_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_model_errors_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is not a directory"):
        blip(tmp_path / "missing")
    bert = tmp_path / "bert"
    config = BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
    )
    BertModel(config).save_pretrained(bert)
    with pytest.raises(UserError, match="is a 'bert' model; .* BLIP or BLIP-2"):
        blip(bert)
    with pytest.raises(UserError, match="Could not load caption.model"):
        blip(tmp_path)  # a directory, but no model in it
