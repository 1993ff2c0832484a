"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, `StableDiffusionPipeline`.

The cached conditioning is the text encoder's last hidden state (`text`, [B, L, D]); the UNet
takes no added conditioning. The building blocks live in `sdflow.models.components` (scratch components,
loading, `encode_prompts`, `save_pipeline`); this module is the family's face for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from sdflow.config import RunConfig
from sdflow.models.components import encode_prompts, load_component, tokenize_prompts
from sdflow.models.families import TextEncoders, refuse_flow_options
from sdflow.models.files import save_pipeline
from sdflow.models.formats.single_file import Layout


class StableDiffusion:
    name = "sd"
    pipeline_class = StableDiffusionPipeline
    text_parts = ("tokenizer", "text_encoder")
    upcast_vae = False  # encode latents in float32 when the VAE config says force_upcast
    objective = "ddpm"  # sdflow.training.objective
    denoiser_part = "unet"
    latent_multiple = 1  # latent sides the UNet accepts (it pads odd ones)
    denoiser_class = UNet2DConditionModel
    export_formats = ("diffusers", "single_file", "kohya")
    single_file_marker = "cond_stage_model."  # the text encoder's prefix in a single file
    kohya_text = ("lora_te",)  # kohya's names of the text encoders' adapters

    def single_file_layout(self, text: TextEncoders) -> Layout:
        """LDM names; SD 2.x's text encoder (gelu: OpenCLIP's tower) in OpenCLIP's names."""
        if text.encoders[0].config.hidden_act == "gelu":
            return Layout((("cond_stage_model.model.", "open_clip"),), "stable-diffusion-v2",
                          "diffusers", ldm_yaml=True)  # fmt: skip
        text_prefix = (("cond_stage_model.transformer.", "clip"),)
        return Layout(text_prefix, "stable-diffusion-v1", "diffusers", ldm_yaml=True)

    def check(self, config: RunConfig) -> None:
        """Every sdflow option applies to SD, but the flow families' ones."""
        refuse_flow_options(config, "Stable Diffusion")

    def load_text(self, sources: Any, config: RunConfig, dtype: Any = None) -> TextEncoders:
        model = config.model
        tokenizer = load_component(
            sources.tokenizer, sources.tokenizer_subfolder, CLIPTokenizer, model
        )
        encoder = load_component(
            sources.text_encoder, sources.text_encoder_subfolder, CLIPTextModel, model, dtype
        )
        return TextEncoders([tokenizer], [encoder.requires_grad_(False).eval()])

    def encode_prompts(self, text: TextEncoders, prompts: list[str]) -> dict[str, Tensor]:
        return {"text": encode_prompts(text.tokenizers[0], text.encoders[0], prompts)}

    def tokenize(self, text: TextEncoders, prompts: list[str]) -> Tensor:
        return tokenize_prompts(text.tokenizers[0], prompts)

    def trainable_text(self, encoders: list[Any]) -> Any:
        return encoders[0]

    def text_modules(self, trainable: Any) -> list[Any]:
        return [trainable]

    def added_conditioning(self, rows, pooled, latent_hw, info) -> dict[str, Tensor] | None:
        return None

    def pipeline(self, unet, vae, text: TextEncoders | None, scheduler) -> StableDiffusionPipeline:
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text.encoders[0] if text else None,
            tokenizer=text.tokenizers[0] if text else None,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def prompt_kwargs(self, embeddings: dict[str, Tensor], empty: dict[str, Tensor]) -> dict:
        return {"prompt_embeds": embeddings["text"], "negative_prompt_embeds": empty["text"]}

    def save_pipeline(self, out_dir: Path, unet, vae, text: TextEncoders, scheduler) -> None:
        save_pipeline(out_dir, unet, vae, text.encoders[0], text.tokenizers[0], scheduler)

    def text_cache_dtype(self, config: RunConfig) -> Any:
        return None  # latents.dtype

    def load_kwargs(self) -> dict[str, Any]:
        return {"safety_checker": None, "requires_safety_checker": False}


FAMILY = StableDiffusion()
