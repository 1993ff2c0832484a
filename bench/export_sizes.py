"""Sizes of the exports of the SD 1.5 profiles, computed from the real architectures.

Run `python bench/export_sizes.py` (CPU, no download, seconds): the UNet of bench/gpu_step.py's
SD15_UNET, SD 1.5's VAE and CLIP ViT-L/14 text encoder are built on the meta device (no memory),
mapped to their single-file names as the export maps them, and counted; sizes are parameters times
the export dtype's bytes (the safetensors header adds well under 1 MB). LoRA: the profile's rank on
its `train.lora_targets`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from peft import LoraConfig
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_step import SD15_UNET  # noqa: E402

from sdflow.models.families import TextEncoders, get_family  # noqa: E402
from sdflow.models.formats.single_file import single_file_tensors  # noqa: E402
from sdflow.profiles import load_profile  # noqa: E402

SD15_VAE = dict(  # stable-diffusion-v1-5 vae/config.json
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4,
    sample_size=512,
)  # fmt: skip
CLIP_L = dict(  # openai/clip-vit-large-patch14's text tower (SD 1.5's text_encoder)
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
)  # fmt: skip
BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def numel(tensors) -> int:
    return sum(t.numel() for t in tensors)


def main() -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    family = get_family("sd")
    layout = family.single_file_layout(TextEncoders([None], [text]))
    single = single_file_tensors(layout, unet, vae, [text])
    full = load_profile("sd15-finetune-24gb").train
    print(
        f"sd15-finetune-24gb single file: {len(single)} tensors, {numel(single.values()):,} params"
    )
    for dtype in ("float16", "float32"):
        size = numel(single.values()) * BYTES[dtype]
        marker = " (train.export_dtype default)" if dtype == full.export_dtype else ""
        print(f"  {dtype}: {size / 1e9:.3f} GB ({size / 2**30:.3f} GiB){marker}")
    lora = load_profile("sd15-lora-12gb").train
    unet.add_adapter(LoraConfig(r=lora.lora_rank, lora_alpha=lora.lora_alpha or lora.lora_rank,
                                target_modules=list(lora.lora_targets)))  # fmt: skip
    weights = [p for n, p in unet.named_parameters() if "lora_" in n]
    modules = len(weights) // 2
    print(f"sd15-lora-12gb (rank {lora.lora_rank} on {lora.lora_targets}): {modules} modules, "
          f"{numel(weights):,} params")  # fmt: skip
    for dtype in ("float16", "float32"):
        kohya = (numel(weights) + modules) * BYTES[dtype]  # + one alpha per module
        print(f"  kohya {dtype}: {kohya / 1e6:.2f} MB")
    print(f"  diffusers (float32): {numel(weights) * 4 / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
