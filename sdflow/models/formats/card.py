"""The model card: `README.md` in each exported model directory, in the Hugging Face format.

The metadata is huggingface_hub's `ModelCardData` (base_model when the base is a hub name,
pipeline_tag text-to-image, library_name diffusers, tags, the base's license when its own card
says it); the body says how the model was trained and how to use it. `huggingface-cli upload
<repo> <model dir>` publishes a directory with its card (docs/interop.md); sdflow uploads nothing.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from sdflow.store.stageio import write_atomic

CARD = "README.md"
# the train stage's card says where the evaluation is; the evaluate stage's card puts it there
EVALUATION_PENDING = (
    "Evaluation against the base model: in the card of `sdflow export` (the evaluate stage's "
    "`card/`), written after the evaluate stage."
)
BESIDE = "(beside this folder)"  # the exports, in the train stage; `sdflow export` puts them in it
FAMILY_TAGS = {"sd": ["stable-diffusion"], "sdxl": ["stable-diffusion-xl"]}


@dataclass
class CardFacts:
    """What the card says about one exported model."""

    family: str
    kind: str  # "pipeline" or "lora"
    pipeline_class: str
    base: str | None  # model.pretrained: a hub name, a folder, or None (scratch)
    base_is_hub: bool
    training: dict[str, Any]  # profile, mode, steps, lr, batch size, resolution / buckets, data
    validation: list[list[float]] = field(default_factory=list)  # [step, held-out loss]
    exports: dict[str, str] = field(default_factory=dict)  # format -> file name (stage dir)
    images: dict[str, Path] = field(default_factory=dict)  # caption -> png to copy beside


def base_license(base: str | None) -> str | None:
    """The license on the base model's own card, when it is a local folder with one."""
    card = Path(base or "") / CARD
    if not base or not card.is_file():
        return None
    return ModelCard.load(card).data.to_dict().get("license")


def model_card(facts: CardFacts, license: str | None = None) -> ModelCard:
    tags = ["text-to-image", "diffusers", "sdflow", *FAMILY_TAGS.get(facts.family, [])]
    if facts.kind == "lora":
        tags.append("lora")
    data = ModelCardData(
        base_model=facts.base if facts.base_is_hub else None,
        pipeline_tag="text-to-image",
        library_name="diffusers",
        license=license,
        tags=tags,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + _body(facts))


def _body(facts: CardFacts) -> str:
    base = facts.base or "random initialisation (trained from scratch)"
    lines = [f"# {facts.family} {facts.kind} trained with sdflow", "", f"Base: `{base}`.", ""]
    lines += ["## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in facts.training.items()]
    if facts.validation:
        lines += ["", "## Held-out validation loss", "", "| step | loss |", "|---|---|"]
        lines += [f"| {int(step)} | {loss:.5g} |" for step, loss in facts.validation]
    for caption, image in facts.images.items():
        lines += ["", f"![{caption}]({image.name})"]
    lines += ["", EVALUATION_PENDING, ""]
    return "\n".join(lines + _usage(facts)) + "\n"


def _usage(facts: CardFacts) -> list[str]:
    cls = facts.pipeline_class
    if facts.kind == "lora":
        load = [f"pipe = {cls}.from_pretrained({facts.base or '<base>'!r})",
                'pipe.load_lora_weights("<this folder>")']  # fmt: skip
    else:
        load = [f'pipe = {cls}.from_pretrained("<this folder>")']
    lines = ["## Use", "", "```python", f"from diffusers import {cls}", "", *load,
             'image = pipe("a prompt").images[0]', "```", ""]  # fmt: skip
    if single := facts.exports.get("single_file"):
        lines += [f"ComfyUI / A1111 / Forge: `{single}` {BESIDE} goes into "
                  "`ComfyUI/models/checkpoints/` or `stable-diffusion-webui/models/Stable-diffusion/`"
                  + (f" with `{facts.exports['single_file_config']}` beside it" if
                     "single_file_config" in facts.exports else "") + ".", ""]  # fmt: skip
    if kohya := facts.exports.get("kohya_lora"):
        lines += [f"ComfyUI / A1111 / Forge: `{kohya}` {BESIDE} goes into "
                  "`ComfyUI/models/loras/` or `stable-diffusion-webui/models/Lora/`.", ""]  # fmt: skip
    return lines


def write_card(model_dir: Path, facts: CardFacts, license: str | None = None) -> None:
    """`model_dir/README.md`, and the card's images copied beside it."""
    for image in facts.images.values():
        if image.is_file():
            shutil.copyfile(image, model_dir / image.name)
    write_atomic(model_dir / CARD, str(model_card(facts, license)).encode())
