"""The `train.prior_preservation` section: DreamBooth's class images and prior loss.

DreamBooth (Ruiz et al. 2022, arXiv 2208.12242) trains a subject under a rare identifier
("a photo of sks dog") and, against language drift and overfitting, keeps the model's prior of
the subject's class: images the base model generates for the class prompt ("a photo of a dog")
are trained on beside the instance images, their loss weighted by `loss_weight`. The class
images come from the `class_images` stage (generated with the base, or read from
`class_images_dir`). Checks that need other sections (a pretrained base) are in
`check_prior_preservation`, called by `RunConfig`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from sdflow.config.base import Section


class PriorPreservation(Section):
    """Class images trained beside the instance images, with the prior-preservation loss."""

    class_prompt: str = Field(
        min_length=1,
        description="the class the subject belongs to, e.g. 'a photo of a dog': the class images' "
        "prompt (generation) and caption (training)",
    )
    num_class_images: int = Field(
        100,
        ge=1,
        le=100_000,
        description="class images generated (or, with class_images_dir, the folder must hold at "
        "least this many; the first ones by name are used)",
    )
    loss_weight: float = Field(
        1.0, ge=0, le=100, description="weight of the prior loss: instance loss + w x prior loss"
    )
    class_images_dir: str | None = Field(
        None,
        description="a folder of class images (png, jpg, webp) used instead of generating them",
    )
    steps: int = Field(25, ge=1, le=1000, description="sampler steps per generated image")
    guidance_scale: float = Field(
        7.5, ge=0, description="classifier-free guidance of the generation; <= 1: none"
    )
    seed: int = Field(0, description="class image i is generated with seed + i")
    batch_size: int = Field(4, ge=1, le=256, description="images generated per pipeline call")

    @field_validator("class_images_dir")
    @classmethod
    def _folder_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_dir():
            raise ValueError(
                f"class_images_dir {value!r} is not a folder: give a folder of class images, "
                "or leave it unset to generate them with the base model"
            )
        return value


def check_prior_preservation(prior: PriorPreservation | None, init: str) -> None:
    """Prior preservation keeps a pretrained model's prior: a scratch model has none."""
    if prior is not None and init != "pretrained":
        raise ValueError(
            f"train.prior_preservation is set but model.init is {init!r}: prior preservation "
            "keeps what a pretrained base knows of the class (its generated class images), and a "
            "from-scratch model knows nothing yet; set model.init: pretrained and "
            "model.pretrained, or remove train.prior_preservation"
        )
