"""What the rectified-flow families (`sd3`, `flux`) share: a T5 text encoder whose states are cached
up to `model.max_sequence_length` tokens, a transformer denoiser in the pipeline's `transformer/`
folder, the flow-matching objective (`sdflow.training.flow_objective`) and the checks that refuse
the DDPM families' options.

T5 states are large (`max_sequence_length` x 4,096 values per caption for T5-XXL), so the latents
stage stores a flow family's caption states in the training precision (`train.mixed_precision`:
bf16 or fp16 halves them) rather than `latents.dtype`.

`train.text_encoder: lora` trains a LoRA on the CLIP encoder(s) (SD3: both, Flux: its one), as
diffusers' DreamBooth LoRA scripts do with `--train_text_encoder`; T5 stays frozen. The cache
then holds each caption's token ids, the CLIP tokenizers' and T5's side by side (`input_ids`,
[B, 77 (x2 for SD3) + L]); `FlowTextEncoder` splits them and computes at every step what
`encode_prompts` caches (`conditioning`), the CLIPs with gradients, T5 without.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import T5EncoderModel, T5TokenizerFast

from sdflow.config import RunConfig
from sdflow.errors import UserError
from sdflow.models.components import load_component
from sdflow.models.families import TextEncoders, pooled_prompt_kwargs
from sdflow.models.quantize import text_quantization

PIPELINE_LIMIT = 512  # StableDiffusion3Pipeline and FluxPipeline refuse longer T5 sequences


class FlowFamily:
    """The shared half of `sd3` and `flux`; each subclass names its pipeline and text parts."""

    name: str
    pipeline_class: type
    text_parts: tuple[str, ...]
    t5_part: tuple[str, str]  # (tokenizer, encoder) subfolders of T5
    default_sequence_length: int
    upcast_vae = False  # the 16-channel VAEs of SD3 and Flux encode in the configured precision
    objective = "flow"
    denoiser_part = "transformer"
    latent_multiple = 2  # SD3's 2x2 patches, Flux's 2x2 packing
    export_formats = ("diffusers",)  # single-file and kohya layouts: not yet for these families
    kohya_text: tuple[str, ...] = ()
    denoiser_class: type

    def check(self, config: RunConfig) -> None:
        train, label = config.train, self.label()
        if train.snr_gamma is not None:
            raise UserError(
                f"train.snr_gamma is {train.snr_gamma} but the model is {label}, trained by "
                "rectified flow: min-SNR weights a DDPM noise schedule it does not have; use "
                "train.flow.weighting (none, sigma_sqrt, cosmap) and unset snr_gamma."
            )
        if train.prediction_type is not None:
            raise UserError(
                f"train.prediction_type is {train.prediction_type!r} but the model is {label}: it "
                "predicts the flow (noise minus latents), not epsilon or v; unset prediction_type."
            )
        if not train.cache_latents:
            raise UserError(
                f"train.cache_latents is false but the model is {label}: its pooled and T5 states "
                "come from the latents cache; allowed: true."
            )
        if train.text_encoder == "full":
            raise UserError(
                f"train.text_encoder is 'full' but the model is {label}: fully training its "
                "CLIP and T5 encoders is not supported; allowed: 'frozen' (cached states) or "
                "'lora' (with train.mode: lora; LoRA on the CLIP encoders, T5 frozen)."
            )
        if train.attention != "default":
            raise UserError(
                f"train.attention is {train.attention!r} but the model is {label}: its joint "
                "attention has its own processors; allowed: 'default'."
            )
        if train.noise_offset:
            raise UserError(
                f"train.noise_offset is {train.noise_offset} but the model is {label}: offset "
                "noise is a DDPM remedy that rectified flow does not need; set it to 0."
            )

    def label(self) -> str:
        return self.pipeline_class.__name__

    def sequence_length(self, config: RunConfig, tokenizer: Any) -> int:
        """`model.max_sequence_length`, checked against T5's limit; unset: the pipeline's default
        (at most that limit)."""
        limit = min(PIPELINE_LIMIT, int(getattr(tokenizer, "model_max_length", PIPELINE_LIMIT)))
        chosen = config.model.max_sequence_length
        if chosen is None:
            return min(self.default_sequence_length, limit)
        if chosen > limit:
            raise UserError(
                f"model.max_sequence_length is {chosen} but the T5 tokenizer of "
                f"{config.model.pretrained} takes at most {limit} tokens ({self.label()}); "
                f"allowed: 1 to {limit}."
            )
        return chosen

    def load_t5(self, sources: Any, config: RunConfig, dtype: Any) -> tuple[Any, Any]:
        tokenizer_part, encoder_part = self.t5_part
        tokenizer = load_component(sources.tokenizer, tokenizer_part, T5TokenizerFast, config.model)
        quantization = text_quantization(config, dtype)  # model.quantize_text_encoder
        encoder = load_component(
            sources.text_encoder, encoder_part, T5EncoderModel, config.model, dtype, quantization
        )
        return tokenizer, encoder.requires_grad_(False).eval()

    @property
    def trained_text_count(self) -> int:
        """The leading text encoders `train.text_encoder: lora` trains: the CLIPs, not T5."""
        return len(self.text_parts) // 2 - 1

    def conditioning(self, clips: list[Any], t5: Tensor) -> dict[str, Tensor]:
        """The cached `text` and `pooled` of the CLIPs' outputs and T5's states."""
        raise NotImplementedError

    def encode_prompts(self, text: TextEncoders, prompts: list[str]) -> dict[str, Tensor]:
        count = self.trained_text_count
        parts = zip(text.tokenizers[:count], text.encoders[:count], strict=True)
        clips = [clip_outputs(tokenizer, encoder, prompts) for tokenizer, encoder in parts]
        t5 = t5_states(text.tokenizers[-1], text.encoders[-1], prompts, text.sequence_length)
        return self.conditioning(clips, t5)

    def tokenize(self, text: TextEncoders, prompts: list[str]) -> Tensor:
        """The CLIP tokenizers' ids and T5's, side by side ([B, 77 (x2) + L])."""
        from sdflow.models.components import tokenize_prompts

        count = self.trained_text_count
        for tokenizer, encoder in zip(text.tokenizers[:count], text.encoders[:count], strict=True):
            if tokenizer.model_max_length != encoder.config.max_position_embeddings:
                raise UserError(
                    f"The CLIP tokenizer of {self.label()} pads to {tokenizer.model_max_length} "
                    f"tokens but its encoder takes {encoder.config.max_position_embeddings}: "
                    "train.text_encoder: lora needs them equal; use 'frozen'."
                )
        clips = [tokenize_prompts(tokenizer, prompts) for tokenizer in text.tokenizers[:count]]
        t5 = t5_ids(text.tokenizers[-1], prompts, text.sequence_length)
        return torch.cat([*clips, t5], dim=1)

    def trainable_text(self, encoders: list[Any]) -> FlowTextEncoder:
        return FlowTextEncoder(self, encoders[:-1], encoders[-1])

    def text_modules(self, trainable: FlowTextEncoder) -> list[Any]:
        return list(trainable.encoders)  # the trained CLIPs, in pipeline order (no T5)

    def pipeline(self, unet, vae, text: TextEncoders | None, scheduler) -> Any:
        """The pipeline of these components; without `text` its tokenizers and encoders are None
        (prompts are given as embeddings)."""
        tokenizers = text.tokenizers if text else [None] * (len(self.text_parts) // 2)
        encoders = text.encoders if text else [None] * (len(self.text_parts) // 2)
        parts = dict(zip(self.text_parts[0::2], tokenizers, strict=True))
        parts |= dict(zip(self.text_parts[1::2], encoders, strict=True))
        return self.pipeline_class(transformer=unet, scheduler=scheduler, vae=vae, **parts)

    def prompt_kwargs(self, embeddings: dict[str, Tensor], empty: dict[str, Tensor]) -> dict:
        return pooled_prompt_kwargs(embeddings, empty)

    def save_pipeline(self, out_dir: Path, unet, vae, text: TextEncoders, scheduler) -> None:
        from sdflow.models.files import save_pipeline_dir

        save_pipeline_dir(out_dir, self.pipeline(unet, vae, text, scheduler))

    def load_kwargs(self) -> dict[str, Any]:
        return {}

    def text_cache_dtype(self, config: RunConfig) -> torch.dtype | None:
        """T5 states in the training precision (bf16/fp16 halve them); else `latents.dtype`."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.train.mixed_precision)


class FlowTextEncoder(nn.Module):
    """The trained CLIP(s) and frozen T5 as one module: ids [B, 77 (x2) + L] (`tokenize`) ->
    (`text`, `pooled`) as `encode_prompts` computes them; gradients reach the CLIPs only."""

    def __init__(self, family: FlowFamily, clips: list[Any], t5: Any):
        super().__init__()
        self.family = family
        self.encoders = nn.ModuleList(clips)
        self.t5 = t5.requires_grad_(False).eval()

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        outputs, start = [], 0
        for encoder in self.encoders:
            length = encoder.config.max_position_embeddings
            outputs.append(encoder(ids[:, start : start + length], output_hidden_states=True))
            start += length
        with torch.no_grad():
            t5 = self.t5(ids[:, start:])[0]
        encoded = self.family.conditioning(outputs, t5)
        return encoded["text"], encoded["pooled"]

    def train(self, mode: bool = True) -> FlowTextEncoder:
        super().train(mode)
        self.t5.eval()  # frozen: no dropout, as diffusers' scripts leave it
        return self


def t5_ids(tokenizer: Any, prompts: list[str], length: int) -> Tensor:
    """T5's token ids [B, length], as both pipelines' `_get_t5_prompt_embeds` make them."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids


def t5_states(tokenizer: Any, encoder: Any, prompts: list[str], length: int) -> Tensor:
    """T5's last hidden states [B, length, D], as both pipelines' `_get_t5_prompt_embeds`."""
    ids = t5_ids(tokenizer, prompts, length)
    return encoder(ids.to(next(encoder.parameters()).device))[0]


def clip_outputs(tokenizer: Any, encoder: Any, prompts: list[str]) -> Any:
    """A CLIP encoder's outputs (all hidden states) for prompts padded to its tokenizer's length."""
    from sdflow.models.components import tokenize_prompts

    ids = tokenize_prompts(tokenizer, prompts).to(next(encoder.parameters()).device)
    return encoder(ids, output_hidden_states=True)
