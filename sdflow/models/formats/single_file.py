"""The single-file checkpoint: one `.safetensors` in the original Stable Diffusion key layout.

A1111, ComfyUI and Forge read a model as one file whose keys follow the original code's module
names: the LDM names (`model.diffusion_model.input_blocks.1.1...`, `first_stage_model.encoder.down.0
...`, `cond_stage_model.transformer.text_model...`) for SD 1.x / 2.x and the SGM names
(`conditioner.embedders.0/1...`) for SDXL. Export (`export_single_file`) maps a diffusers pipeline's
weights onto those names; the map is the inverse of diffusers' own reader
(`diffusers.loaders.single_file_utils`: its direct-name tables are used as they are, its block
arithmetic inverted here), and the tests load every export back with `from_single_file`.
Import: `sdflow.models.formats.single_file_base` (diffusers' own reader).

What the layout carries beside the weights: the prediction type, in the `modelspec.prediction_type`
metadata (SAI model spec) and, for v-prediction, the `v_pred` marker key that ComfyUI and Forge
read and a companion `<name>.yaml` (an LDM config with `parameterization: v`) that A1111 reads for
SD 2.x-style models. Not carried: the scheduler's other settings, the tokenizer (the tools bring
their own CLIP tokenizers) and any `_name_or_path`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file
from torch import Tensor

from sdflow.errors import UserError
from sdflow.store.stageio import write_atomic

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
V_PRED_KEY = "v_pred"  # an empty tensor: ComfyUI / Forge read v-prediction from its presence
RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
          ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))  # fmt: skip
VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                 ("to_out.0", "proj_out"))  # fmt: skip
OPEN_CLIP = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
             ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))  # fmt: skip


def _rename(rest: str, pairs: tuple[tuple[str, str], ...]) -> str:
    head, _, leaf = rest.rpartition(".")
    for new, old in pairs:
        if head == new:
            return f"{old}.{leaf}"
    return rest


# ------------------------------------------------------------------------------------- UNet


def unet_to_ldm(state: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """A diffusers UNet2DConditionModel state dict in the LDM / SGM UNet names (no prefix)."""
    direct = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])  # diffusers name -> original
    if config.get("addition_embed_type") == "text_time":
        direct |= DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]
    per_level = int(config["layers_per_block"]) + 1
    attention_up = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    out = {}
    for name, tensor in state.items():
        out[direct.get(name) or _unet_block_name(name, per_level, attention_up)] = tensor
    return out


def _unet_block_name(name: str, per_level: int, attention_up: list[bool]) -> str:
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        block = 1 + int(m[1]) * per_level + int(m[3])
        return _layer(f"input_blocks.{block}", m[2], m[4])
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name):
        return f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name):
        index = 2 * int(m[2]) if m[1] == "resnets" else 1
        return _layer(f"middle_block.{index}", m[1], m[3])
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        return _layer(f"output_blocks.{int(m[1]) * per_level + int(m[3])}", m[2], m[4])
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", name):
        level = int(m[1])
        slot = 2 if attention_up[level] else 1
        return f"output_blocks.{level * per_level + per_level - 1}.{slot}.conv.{m[2]}"
    raise UserError(f"The UNet weight {name!r} has no place in the single-file layout.")


def _layer(block: str, kind: str, rest: str) -> str:
    if kind == "resnets":
        return f"{block}{'' if block.startswith('middle') else '.0'}.{_rename(rest, RESNET)}"
    return f"{block}{'' if block.startswith('middle') else '.1'}.{rest}"


# -------------------------------------------------------------------------------------- VAE


def vae_to_ldm(state: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """A diffusers AutoencoderKL state dict in the LDM names (no prefix)."""
    direct = DIFFUSERS_TO_LDM_MAPPING["vae"]
    levels = len(config["up_block_types"])
    out = {}
    for name, tensor in state.items():
        if name in direct:
            out[direct[name]] = tensor
            continue
        new, tensor = _vae_block(name, tensor, levels)
        out[new] = tensor
    return out


def _vae_block(name: str, tensor: Tensor, levels: int) -> tuple[str, Tensor]:
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", name):
        rest = m[3].replace("conv_shortcut", "nin_shortcut")
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{rest}", tensor
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", name):
        rest = _rename(m[2], VAE_ATTENTION)
        if tensor.ndim == 2:  # the original attention's projections are 1x1 convolutions
            tensor = tensor[:, :, None, None]
        return f"{m[1]}.mid.attn_1.{rest}", tensor
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return (
            f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}",
            tensor,
        )
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", name):
        return f"encoder.down.{m[1]}.downsample.{m[2]}", tensor
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        level = levels - 1 - int(m[1])  # the original counts decoder levels from the bottom
        return (
            f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}",
            tensor,
        )
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", name):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}", tensor
    raise UserError(f"The VAE weight {name!r} has no place in the single-file layout.")


# ------------------------------------------------------------------------------ text encoders


def clip_to_ldm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformers CLIP text model in the layout the originals keep it (`text_model.` names)."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("position_ids"):
            continue
        plain = name.removeprefix("text_model.")
        out[name if name.startswith("text_projection") else f"text_model.{plain}"] = tensor
    return out


def open_clip_to_ldm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformers CLIP text model in OpenCLIP's names (SD 2.x, SDXL's second encoder): fused
    q/k/v `in_proj`, `resblocks`, `text_projection` transposed (the inverse of diffusers'
    `convert_open_clip_checkpoint`)."""
    plain = {n.removeprefix("text_model."): t for n, t in state.items()}
    direct = {k.removeprefix("text_model."): v for k, v in
              DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"].items()}  # fmt: skip
    out, fused = {}, {}
    for name, tensor in plain.items():
        if name.endswith("position_ids"):
            continue
        if name in direct:
            out[direct[name]] = (
                tensor.T.contiguous() if name == "text_projection.weight" else tensor
            )
        elif m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", name):
            fused.setdefault((m[1], m[3]), {})[m[2]] = tensor
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.+)", name):
            out[f"transformer.resblocks.{m[1]}.{_rename(m[2], OPEN_CLIP)}"] = tensor
        else:
            raise UserError(f"The text encoder weight {name!r} has no OpenCLIP name.")
    for (layer, kind), parts in fused.items():
        qkv = torch.cat([parts["q"], parts["k"], parts["v"]])
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = qkv
    return out


TEXT_LAYOUTS = {"clip": clip_to_ldm, "open_clip": open_clip_to_ldm}


# ------------------------------------------------------------------------------------ export


@dataclass(frozen=True)
class Layout:
    """A family's single-file layout: the text encoders' key prefixes and OpenCLIP or CLIP names
    (in pipeline order), the SAI model-spec architecture, and the code repository it follows."""

    text: tuple[tuple[str, str], ...]
    architecture: str
    implementation: str
    ldm_yaml: bool  # A1111 reads an LDM `.yaml` beside the file (SD 1.x / 2.x)


DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def single_file_tensors(layout: Layout, unet, vae, encoders: list[Any]) -> dict[str, Tensor]:
    """Every weight of the pipeline under its single-file name."""
    tensors = _prefixed(UNET_PREFIX, unet_to_ldm(unet.state_dict(), dict(unet.config)))
    tensors |= _prefixed(VAE_PREFIX, vae_to_ldm(vae.state_dict(), dict(vae.config)))
    for (prefix, kind), encoder in zip(layout.text, encoders, strict=True):
        tensors |= _prefixed(prefix, TEXT_LAYOUTS[kind](encoder.state_dict()))
    return tensors


def _prefixed(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + name: tensor for name, tensor in state.items()}


def export_single_file(
    path: Path, layout: Layout, parts: tuple, dtype: str, prediction_type: str, title: str
) -> list[str]:
    """Write `path` (and, for v-prediction with an LDM layout, `path.with_suffix('.yaml')`) from
    `parts` = (unet, vae, encoders); returns the names written. Byte-reproducible: sorted header."""
    from sdflow.models.files import canonical_safetensors

    unet, vae, encoders = parts
    tensors = single_file_tensors(layout, unet, vae, encoders)
    tensors = {n: t.detach().to(DTYPES[dtype]).contiguous() for n, t in tensors.items()}
    v_prediction = prediction_type == "v_prediction"
    if v_prediction:
        tensors[V_PRED_KEY] = torch.tensor([])
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": layout.architecture,
        "modelspec.implementation": layout.implementation,
        "modelspec.title": title,
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "sdflow.prediction_type": prediction_type,
        "sdflow.dtype": dtype,
    }
    save_file(tensors, str(path), metadata=metadata)
    canonical_safetensors(path)
    written = [path.name]
    if v_prediction and layout.ldm_yaml:
        text = yaml.safe_dump(ldm_config(unet.config, vae.config, layout), sort_keys=True)
        write_atomic(path.with_suffix(".yaml"), text.encode())
        written.append(path.with_suffix(".yaml").name)
    return written


def ldm_config(unet: Any, vae: Any, layout: Layout) -> dict[str, Any]:
    """The original code's config of a v-prediction SD model (what A1111 reads from the `.yaml`
    beside a checkpoint): `parameterization: v` and the UNet / VAE shapes."""
    base = unet["block_out_channels"][0]
    mult = [c // base for c in unet["block_out_channels"]]
    heads = unet["attention_head_dim"]
    attention = [2**i for i, t in enumerate(unet["down_block_types"]) if t.startswith("CrossAttn")]
    unet_params = {
        "image_size": unet["sample_size"], "in_channels": unet["in_channels"],
        "out_channels": unet["out_channels"], "model_channels": base, "channel_mult": mult,
        "num_res_blocks": unet["layers_per_block"], "attention_resolutions": attention,
        "transformer_depth": 1, "context_dim": unet["cross_attention_dim"],
        "use_linear_in_transformer": bool(unet["use_linear_projection"]),
        "use_checkpoint": False, "legacy": False,
    }  # fmt: skip
    if isinstance(heads, int):
        unet_params["num_heads"] = heads
    else:  # a per-level list: heads per level = channels / head channels (SD 2.x: 64)
        unet_params["num_head_channels"] = base // heads[0]
    vae_base = vae["block_out_channels"][0]
    ddconfig = {
        "double_z": True, "z_channels": vae["latent_channels"], "resolution": vae["sample_size"],
        "in_channels": vae["in_channels"], "out_ch": vae["out_channels"], "ch": vae_base,
        "ch_mult": [c // vae_base for c in vae["block_out_channels"]],
        "num_res_blocks": vae["layers_per_block"], "attn_resolutions": [], "dropout": 0.0,
    }  # fmt: skip
    open_clip = layout.text[0][1] == "open_clip"
    embedder = "FrozenOpenCLIPEmbedder" if open_clip else "FrozenCLIPEmbedder"
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "parameterization": "v", "linear_start": 0.00085, "linear_end": 0.012,
        "num_timesteps_cond": 1, "timesteps": 1000, "first_stage_key": "jpg",
        "cond_stage_key": "txt", "image_size": unet["sample_size"], "channels": unet["in_channels"],
        "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
        "scale_factor": vae["scaling_factor"], "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                        "params": unet_params},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": vae["latent_channels"], "monitor": "val/rec_loss", "ddconfig": ddconfig,
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": f"ldm.modules.encoders.modules.{embedder}",
                              "params": {"freeze": True, "layer": "penultimate"} if open_clip else {}},
    }}}  # fmt: skip
