"""Stable Diffusion XL: two CLIP text encoders, size and crop conditioning, `StableDiffusionXLPipeline`.

The cached conditioning of a caption is what the pipeline's `encode_prompt` computes: both
encoders' penultimate hidden states concatenated on the last dimension (`text`, [B, L, D1 + D2])
and the second encoder's pooled projection (`pooled`, [B, P]). The UNet's added conditioning is
`text_embeds` (the pooled projection) and `time_ids`: original size (h, w), crop top-left
(top, left) and target size (h, w) per sample (Podell et al. 2023, arXiv 2307.01952, §2.2). The
original size and crop come from the latents rows (`original_size`, `crop_top_left`) when the
latents stage recorded them, else the square crop's (resolution, resolution) and (0, 0); the target
size is the latent's (h, w) times the VAE's scale factor.

A run that trains the text encoders (`train.text_encoder` lora or full: both encoders) caches both
tokenizers' ids side by side (`input_ids`, [B, 2L]); `DualTextEncoder` splits them and returns the
concatenated penultimate states and the pooled projection, with gradients. Not supported (refused
before any work): `train.cache_latents: false`. SDXL is fine-tuned from a pretrained pipeline, not
built from scratch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdflow.config import RunConfig
from sdflow.errors import UserError
from sdflow.models.components import load_component, tokenize_prompts
from sdflow.models.families import TextEncoders, pooled_prompt_kwargs, refuse_flow_options
from sdflow.models.files import save_pipeline_dir
from sdflow.models.formats.single_file import Layout

ENCODERS = (("tokenizer", "text_encoder", CLIPTextModel),
            ("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection))  # fmt: skip


def time_ids(original_size: Tensor, crop_top_left: Tensor, target_size: Tensor) -> Tensor:
    """[B, 6] float: original (h, w), crop (top, left), target (h, w) of each sample."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).float()


def batch_time_ids(rows: dict[str, Any], latent_hw: tuple[int, int], info: dict) -> Tensor:
    """The time ids of a batch of latents rows: their recorded original size and crop, or the
    square crop of `info["resolution"]` at (0, 0) where the cache has none."""
    mean = rows["mean"]
    size = len(mean)
    resolution = int(info["resolution"])
    original = rows.get("original_size")
    if original is None:
        original = torch.tensor([[resolution, resolution]]).expand(size, 2)
    crop = rows.get("crop_top_left")
    if crop is None:
        crop = torch.zeros(size, 2, dtype=torch.int64)
    scale = int(info["vae_scale_factor"])
    target = torch.tensor([[latent_hw[0] * scale, latent_hw[1] * scale]]).expand(size, 2)
    return time_ids(original, crop, target)


class DualTextEncoder(nn.Module):
    """Both trained text encoders as one module: ids [B, 2L] (each tokenizer's L side by side) ->
    (penultimate states of both, concatenated [B, L, D1 + D2], pooled projection [B, P])."""

    def __init__(self, encoder: nn.Module, encoder_2: nn.Module):
        super().__init__()
        self.encoders = nn.ModuleList([encoder, encoder_2])

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        first, second = ids.chunk(2, dim=1)
        out = self.encoders[0](first, output_hidden_states=True)
        out_2 = self.encoders[1](second, output_hidden_states=True)
        hidden = torch.cat([out.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        return hidden, out_2[0]


class StableDiffusionXL:
    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    text_parts = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    upcast_vae = True  # encode latents in float32 when the VAE config says force_upcast
    objective = "ddpm"  # sdflow.training.objective
    denoiser_part = "unet"
    latent_multiple = 1  # latent sides the UNet accepts (it pads odd ones)
    denoiser_class = UNet2DConditionModel
    export_formats = ("diffusers", "single_file", "kohya")
    single_file_marker = "conditioner.embedders."  # the text encoders' prefix in a single file
    kohya_text = ("lora_te1", "lora_te2")  # kohya's names of the text encoders' adapters

    def single_file_layout(self, text: TextEncoders) -> Layout:
        """SGM names: CLIP ViT-L as `conditioner.embedders.0`, OpenCLIP bigG as `.1` (no LDM
        `.yaml`: v-prediction is marked by the `v_pred` key and the metadata only)."""
        text_prefixes = (("conditioner.embedders.0.transformer.", "clip"),
                         ("conditioner.embedders.1.model.", "open_clip"))  # fmt: skip
        return Layout(text_prefixes, "stable-diffusion-xl-v1-base",
                      "https://github.com/Stability-AI/generative-models", ldm_yaml=False)  # fmt: skip

    def check(self, config: RunConfig) -> None:
        refuse_flow_options(config, "SDXL")
        if not config.train.cache_latents:
            raise UserError(
                "train.cache_latents is false but the model is SDXL: its pooled embedding and size "
                "conditioning come from the latents cache; allowed for SDXL: true."
            )

    def load_text(self, sources: Any, config: RunConfig, dtype: Any = None) -> TextEncoders:
        tokenizers, encoders = [], []
        for tokenizer, encoder, cls in ENCODERS:
            tokenizers.append(
                load_component(sources.tokenizer, tokenizer, CLIPTokenizer, config.model)
            )
            model = load_component(sources.text_encoder, encoder, cls, config.model, dtype)
            encoders.append(model.requires_grad_(False).eval())
        return TextEncoders(tokenizers, encoders)

    def encode_prompts(self, text: TextEncoders, prompts: list[str]) -> dict[str, Tensor]:
        """As `StableDiffusionXLPipeline.encode_prompt` (no clip skip): penultimate hidden states
        of both encoders, concatenated; the second encoder's pooled projection."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(text.tokenizers, text.encoders, strict=True):
            ids = tokenize_prompts(tokenizer, prompts).to(next(encoder.parameters()).device)
            out = encoder(ids, output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return {"text": torch.cat(hidden, dim=-1), "pooled": pooled}

    def tokenize(self, text: TextEncoders, prompts: list[str]) -> Tensor:
        return torch.cat([tokenize_prompts(t, prompts) for t in text.tokenizers], dim=1)

    def trainable_text(self, encoders: list[Any]) -> DualTextEncoder:
        return DualTextEncoder(*encoders)

    def text_modules(self, trainable: DualTextEncoder) -> list[Any]:
        return list(trainable.encoders)

    def added_conditioning(self, rows, pooled, latent_hw, info) -> dict[str, Tensor]:
        return {"text_embeds": pooled, "time_ids": batch_time_ids(rows, latent_hw, info)}

    def pipeline(
        self, unet, vae, text: TextEncoders | None, scheduler
    ) -> StableDiffusionXLPipeline:
        tokenizers = text.tokenizers if text else [None, None]
        encoders = text.encoders if text else [None, None]
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=encoders[0],
            text_encoder_2=encoders[1],
            tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )

    def prompt_kwargs(self, embeddings: dict[str, Tensor], empty: dict[str, Tensor]) -> dict:
        return pooled_prompt_kwargs(embeddings, empty)

    def save_pipeline(self, out_dir: Path, unet, vae, text: TextEncoders, scheduler) -> None:
        save_pipeline_dir(out_dir, self.pipeline(unet, vae, text, scheduler))

    def text_cache_dtype(self, config: RunConfig) -> Any:
        return None  # latents.dtype

    def load_kwargs(self) -> dict[str, Any]:
        return {}


FAMILY = StableDiffusionXL()
