"""Model families: what differs between Stable Diffusion 1.x/2.x and SDXL, behind one interface.

A family owns its text side and its pipeline: which text encoders and tokenizers it loads, how a
prompt becomes the cached tensors (`encode_prompts`), the UNet's conditioning of a batch (the
`encoder_hidden_states` and `added_cond_kwargs`), the diffusers pipeline class it exports and samples
with, and saving that pipeline. Everything else (the latents cache, the loop, checkpoints, EMA,
min-SNR, LoRA, evaluation) is shared. A new family (SD3, Flux) is one module here plus an entry in
`FAMILIES`.

The family of a run comes from the pipeline directory's `model_index.json` (`_class_name`), or from
`model.family` (default `sd`) for a model trained from scratch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from sdflow.config import RunConfig
from sdflow.errors import UserError


@dataclass
class TextEncoders:
    """A family's tokenizers and text encoders, in the order the pipeline uses them."""

    tokenizers: list[Any]
    encoders: list[Any]
    sequence_length: int | None = None  # T5 tokens per caption (sd3, flux)


class Family(Protocol):
    """What sdflow asks of a model family."""

    name: str
    pipeline_class: type
    text_parts: tuple[str, ...]  # the pipeline's text subfolders (tokenizers and encoders)
    upcast_vae: bool  # fp16 latents encoding runs in float32 when the VAE sets `force_upcast`
    objective: str  # "ddpm" (sdflow.training.objective) or "flow" (sdflow.training.flow_objective)
    denoiser_part: str  # the pipeline's denoiser subfolder: unet or transformer
    denoiser_class: type  # its diffusers class
    latent_multiple: int  # latent sides must be multiples of this (the transformers' patches: 2)

    def check(self, config: RunConfig) -> None:
        """Refuse, with a UserError, settings this family does not support."""

    def load_text(self, sources: Any, config: RunConfig, dtype: Any = None) -> TextEncoders:
        """The frozen tokenizers and text encoders of the run."""

    def encode_prompts(self, text: TextEncoders, prompts: list[str]) -> dict[str, Tensor]:
        """The cached conditioning of each prompt, as the family's pipeline computes it."""

    def tokenize(self, text: TextEncoders, prompts: list[str]) -> Tensor:
        """Token ids [B, L'] cached for a run that trains the text encoder(s)."""

    def trainable_text(self, encoders: list[Any]) -> Any:
        """One module of the trained encoders: ids [B, L'] -> (hidden states, pooled embedding)."""

    def text_modules(self, trainable: Any) -> list[Any]:
        """The trained encoders of `trainable_text`'s module, in pipeline order."""

    def added_conditioning(
        self, rows: dict[str, Any], pooled: Tensor | None, latent_hw: tuple[int, int], info: dict
    ) -> dict[str, Tensor] | None:
        """The UNet's `added_cond_kwargs` for a batch (None when the UNet takes none)."""

    def pipeline(self, unet, vae, text: TextEncoders | None, scheduler) -> Any:
        """An in-memory pipeline of these components (no text encoders: embeddings are given)."""

    def prompt_kwargs(self, embeddings: dict[str, Tensor], empty: dict[str, Tensor]) -> dict:
        """The pipeline call's keyword arguments for precomputed prompt and empty-prompt embeddings."""

    def save_pipeline(self, out_dir: Path, unet, vae, text: TextEncoders, scheduler) -> None:
        """A pipeline directory that `pipeline_class.from_pretrained` loads."""

    def load_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments of `pipeline_class.from_pretrained`."""

    def text_cache_dtype(self, config: RunConfig) -> Any:
        """The dtype of the cached caption states; None: `latents.dtype`."""


def refuse_flow_options(config: RunConfig, label: str) -> None:
    """The DDPM families (sd, sdxl) have no flow settings: a set one is a mismatch, not ignored."""
    train = config.train
    default = type(train.flow)()  # compared by value: a config read back from JSON sets them all
    changed = sorted(
        k for k in type(train.flow).model_fields if getattr(train.flow, k) != getattr(default, k)
    )
    if changed:
        raise UserError(
            f"train.flow.{changed[0]} is set but the model is {label}, trained by DDPM: the flow "
            "settings apply to the sd3 and flux families; remove them (or use snr_gamma)."
        )
    if train.guidance_scale != 1.0:
        raise UserError(
            f"train.guidance_scale is {train.guidance_scale} but the model is {label}: it is "
            "Flux's guidance-embedding input; remove it."
        )
    if config.model.max_sequence_length is not None:
        raise UserError(
            f"model.max_sequence_length is {config.model.max_sequence_length} but the model is "
            f"{label}, which has no T5 encoder; its CLIP length is model.max_token_length."
        )


def pooled_prompt_kwargs(embeddings: dict[str, Tensor], empty: dict[str, Tensor]) -> dict:
    """A pipeline call's prompt and empty-prompt states with their pooled projections (SDXL, SD3)."""
    return {
        "prompt_embeds": embeddings["text"],
        "pooled_prompt_embeds": embeddings["pooled"],
        "negative_prompt_embeds": empty["text"],
        "negative_pooled_prompt_embeds": empty["pooled"],
    }


PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}


def get_family(name: str) -> Family:
    from sdflow.models.families import flux, sd, sd3, sdxl

    families: dict[str, Family] = {
        "sd": sd.FAMILY,
        "sdxl": sdxl.FAMILY,
        "sd3": sd3.FAMILY,
        "flux": flux.FAMILY,
    }
    return families[name]


def family_of(config: RunConfig) -> Family:
    """The run's family: the pretrained pipeline's (checked against `model.family`), or
    `model.family` (default sd) from scratch."""
    model = config.model
    if model.init == "scratch":
        return get_family(model.family or "sd")
    found = pipeline_family(model.pretrained, model.revision)
    if model.family is not None and model.family != found:
        raise UserError(
            f"model.family is {model.family!r} but model.pretrained {model.pretrained} is a "
            f"{found!r} pipeline (its model_index.json): unset model.family or set it to {found!r}."
        )
    return get_family(found)


@lru_cache(maxsize=32)
def pipeline_family(source: str, revision: str | None = None) -> str:
    """The family of a pipeline directory or hub name, from its `model_index.json`."""
    from sdflow.models.components import is_hub_name

    if is_hub_name(source):
        from diffusers import DiffusionPipeline

        from sdflow.models.hub import resolve_commit

        index = DiffusionPipeline.load_config(source, revision=resolve_commit(source, revision))
    else:
        path = Path(source).expanduser() / "model_index.json"
        if not path.is_file():
            raise UserError(
                f"model.pretrained {source} has no model_index.json: give a diffusers pipeline "
                "directory (save_pretrained of a StableDiffusionPipeline or "
                "StableDiffusionXLPipeline) or a hub name."
            )
        index = json.loads(path.read_text())
    name = index.get("_class_name")
    if name not in PIPELINE_FAMILIES:
        raise UserError(
            f"model.pretrained {source} is a {name!r} pipeline; sdflow trains "
            f"{', '.join(sorted(PIPELINE_FAMILIES))}."
        )
    return PIPELINE_FAMILIES[name]
