"""Stable Diffusion 3 / 3.5 (Medium, Large): two CLIPs and T5, an MMDiT transformer, rectified flow.

The cached conditioning of a caption is what `StableDiffusion3Pipeline.encode_prompt` computes (no
clip skip): both CLIPs' penultimate states concatenated on the last dimension, zero-padded to T5's
width and followed on the sequence dimension by T5's states (`text`, [B, 77 + L, D_T5]); the two
pooled projections concatenated (`pooled`, [B, P1 + P2]). The transformer takes the pooled
projections as `pooled_projections`; the model call is in `sdflow.training.flow_objective`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from torch import Tensor
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from sdflow.config import RunConfig
from sdflow.models.components import load_component
from sdflow.models.families import TextEncoders
from sdflow.models.families.flow import FlowFamily

CLIPS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


class StableDiffusion3(FlowFamily):
    name = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    text_parts = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2",
                  "tokenizer_3", "text_encoder_3")  # fmt: skip
    t5_part = ("tokenizer_3", "text_encoder_3")
    default_sequence_length = 256  # the pipeline's `max_sequence_length` default
    denoiser_class = SD3Transformer2DModel

    def load_text(self, sources: Any, config: RunConfig, dtype: Any = None) -> TextEncoders:
        tokenizers, encoders = [], []
        for tokenizer, encoder in CLIPS:
            tokenizers.append(
                load_component(sources.tokenizer, tokenizer, CLIPTokenizer, config.model)
            )
            model = load_component(
                sources.text_encoder, encoder, CLIPTextModelWithProjection, config.model, dtype
            )
            encoders.append(model.requires_grad_(False).eval())
        t5_tokenizer, t5 = self.load_t5(sources, config, dtype)
        length = self.sequence_length(config, t5_tokenizer)
        return TextEncoders([*tokenizers, t5_tokenizer], [*encoders, t5], length)

    def conditioning(self, clips: list[Any], t5: Tensor) -> dict[str, Tensor]:
        pooled = [out[0] for out in clips]
        states = [out.hidden_states[-2] for out in clips]
        clip = torch.cat(states, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "text": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
            "pooled": torch.cat(pooled, -1),
        }

    def added_conditioning(self, rows, pooled, latent_hw, info) -> dict[str, Tensor]:
        return {"pooled_projections": pooled}

    def predict(
        self, model, noisy: Tensor, timesteps: Tensor, text: Tensor, added, train
    ) -> Tensor:
        """The transformer's flow prediction, called as StableDiffusion3Pipeline calls it."""
        return model(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=text,
            pooled_projections=added["pooled_projections"],
            return_dict=False,
        )[0]


FAMILY = StableDiffusion3()
