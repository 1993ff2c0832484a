"""Model cards that huggingface_hub parses back with the right metadata."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from sdflow.models.formats.card import CardFacts, base_license, write_card


def test_a_lora_card_of_a_hub_base_parses_back(tmp_path: Path):
    base = tmp_path / "base"
    base.mkdir()
    ModelCard(f"---\n{ModelCardData(license='creativeml-openrail-m').to_yaml()}\n---\nbase\n").save(
        base / "README.md"
    )
    (tmp_path / "loss.png").write_bytes(b"png")
    facts = CardFacts(
        "sdxl", "lora", "StableDiffusionXLPipeline", "org/some-sdxl", True,
        {"steps": 3, "lr": 1e-4}, [[2, 0.25]], {"kohya_lora": "lora-kohya.safetensors"},
        {"training loss": tmp_path / "loss.png"},
    )  # fmt: skip
    model = tmp_path / "lora"
    model.mkdir()
    write_card(model, facts, base_license(str(base)))
    card = ModelCard.load(model / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "org/some-sdxl" and data["license"] == "creativeml-openrail-m"
    assert data["pipeline_tag"] == "text-to-image" and data["library_name"] == "diffusers"
    assert {"lora", "stable-diffusion-xl"} <= set(data["tags"])
    assert "pipe.load_lora_weights" in card.text and "ComfyUI/models/loras/" in card.text
    assert "| 2 | 0.25 |" in card.text and (model / "loss.png").read_bytes() == b"png"


def test_a_local_base_is_named_in_the_body_not_as_base_model(tmp_path: Path):
    facts = CardFacts("sd", "pipeline", "StableDiffusionPipeline", str(tmp_path), False, {})
    write_card(tmp_path, facts, base_license(str(tmp_path / "none")))
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert "base_model" not in data and "license" not in data
