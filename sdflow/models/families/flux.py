"""Flux.1 (dev, schnell, de-distilled bases): CLIP's pooled output and T5's states, a transformer on
2x2-packed latents with position ids, rectified flow with a guidance embedding.

The cached conditioning of a caption is what `FluxPipeline.encode_prompt` computes: T5's last
hidden states (`text`, [B, L, D_T5]) and CLIP's pooled output (`pooled`, [B, D_CLIP]). The
transformer sees the latents packed into 2x2 patches (`pack_latents`: [B, h/2 * w/2, 4C]), image
position ids (`image_ids`: row and column of each patch) and all-zero text ids, as the pipeline
builds them; guidance-distilled bases (dev) also take `guidance` (`train.guidance_scale`).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from sdflow.config import RunConfig
from sdflow.models.components import load_component
from sdflow.models.families import TextEncoders
from sdflow.models.families.flow import FlowFamily


def pack_latents(latents: Tensor) -> Tensor:
    """[B, C, h, w] -> [B, h/2 * w/2, 4C]: each 2x2 patch one token (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, latent_hw: tuple[int, int]) -> Tensor:
    """The inverse of `pack_latents`: [B, h/2 * w/2, 4C] -> [B, C, h, w]."""
    b, _, channels = tokens.shape
    h, w = latent_hw
    patches = tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, h, w)


def image_ids(latent_hw: tuple[int, int]) -> Tensor:
    """[h/2 * w/2, 3]: (0, row, column) of each packed patch."""
    h, w = latent_hw[0] // 2, latent_hw[1] // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


class Flux(FlowFamily):
    name = "flux"
    pipeline_class = FluxPipeline
    text_parts = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    t5_part = ("tokenizer_2", "text_encoder_2")
    default_sequence_length = 512  # the pipeline's `max_sequence_length` default
    denoiser_class = FluxTransformer2DModel

    def load_text(self, sources: Any, config: RunConfig, dtype: Any = None) -> TextEncoders:
        tokenizer = load_component(sources.tokenizer, "tokenizer", CLIPTokenizer, config.model)
        clip = load_component(
            sources.text_encoder, "text_encoder", CLIPTextModel, config.model, dtype
        )
        t5_tokenizer, t5 = self.load_t5(sources, config, dtype)
        length = self.sequence_length(config, t5_tokenizer)
        return TextEncoders(
            [tokenizer, t5_tokenizer], [clip.requires_grad_(False).eval(), t5], length
        )

    def conditioning(self, clips: list[Any], t5: Tensor) -> dict[str, Tensor]:
        return {"text": t5, "pooled": clips[0].pooler_output}

    def added_conditioning(self, rows, pooled, latent_hw, info) -> dict[str, Tensor]:
        return {"pooled_projections": pooled}

    def predict(
        self, model, noisy: Tensor, timesteps: Tensor, text: Tensor, added, train
    ) -> Tensor:
        """The transformer's flow prediction on packed latents, as FluxPipeline calls it: image
        ids, zero text ids, timestep / 1000, and `train.guidance_scale` for a guidance-distilled
        base."""
        size, device = noisy.shape[0], noisy.device
        hw = (noisy.shape[-2], noisy.shape[-1])
        guidance = None
        if getattr(model, "module", model).config.guidance_embeds:
            guidance = torch.full((size,), train.guidance_scale, device=device)
        out = model(
            hidden_states=pack_latents(noisy),
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=added["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=device, dtype=noisy.dtype),
            img_ids=image_ids(hw).to(device, noisy.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, hw)

    def prompt_kwargs(self, embeddings: dict[str, Tensor], empty: dict[str, Tensor]) -> dict:
        # FluxPipeline runs true CFG only with true_cfg_scale > 1; the dev bases use `guidance`
        return {"prompt_embeds": embeddings["text"], "pooled_prompt_embeds": embeddings["pooled"]}


FAMILY = Flux()
