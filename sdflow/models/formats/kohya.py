"""LoRA adapters in kohya's format, and adapter files read back into a trainable model.

kohya-ss/sd-scripts named LoRA weights after the module path with `_` for `.`:
`lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`, and `lora_te_` (SD 1.x / 2.x)
or `lora_te1_` / `lora_te2_` (SDXL) for the text encoders; A1111, ComfyUI, Forge and InvokeAI read
it. Export (`export_kohya`) is diffusers' `convert_state_dict_to_kohya` over the PEFT weights, with
each module's true `alpha` (the converter writes alpha = rank) and the text encoders' module paths
as the originals name them (`text_model.` first). Import (`load_adapter`) is diffusers' reader
(`lora_state_dict`, which turns kohya names into diffusers ones, then `load_lora_into_unet` /
`load_lora_into_text_encoder`): the rank and alpha come from the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import Tensor

from sdflow.errors import UserError

DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
TEXT_PARTS = ("text_encoder", "text_encoder_2")
CONVERTER_NAMES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def kohya_state_dict(unet, encoders: list[Any], text_names: tuple[str, ...]) -> dict[str, Tensor]:
    """The adapters of `unet` and `encoders` (PEFT-injected, adapter `default`) in kohya's names."""
    out = _kohya_part(get_peft_model_state_dict(unet), "unet", "lora_unet", unet)
    for encoder, part, name in zip(encoders, TEXT_PARTS, text_names, strict=False):
        layers = {_text_path(k): v for k, v in get_peft_model_state_dict(encoder).items()}
        out |= _kohya_part(layers, part, name, encoder)
    return out


def _text_path(name: str) -> str:
    """transformers >= 5.6 flattened CLIPTextModel; kohya names keep the `text_model.` level."""
    if name.startswith(("text_model.", "text_projection")):
        return name
    return f"text_model.{name}"


def _kohya_part(layers: dict[str, Tensor], part: str, name: str, module) -> dict[str, Tensor]:
    config = module.peft_config["default"]
    kohya = convert_state_dict_to_kohya({f"{part}.{k}": v for k, v in layers.items()})
    converted = {}
    for key, tensor in kohya.items():
        head, _, leaf = key.partition(".")
        head = name + head.removeprefix(CONVERTER_NAMES[part])  # SD 1.x / 2.x: lora_te_
        if leaf == "alpha":  # the converter writes rank; the run's alpha is the config's
            tensor = torch.tensor(float(config.lora_alpha))
        converted[f"{head}.{leaf}"] = tensor
    return converted


def export_kohya(path: Path, unet, encoders: list[Any], family: Any, dtype: str) -> str:
    """Write the adapter(s) in kohya's format to `path` (sorted header: byte-reproducible)."""
    from sdflow.models.files import canonical_safetensors

    tensors = kohya_state_dict(unet, encoders, family.kohya_text)
    tensors = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    config = unet.peft_config["default"]
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.r),
        "ss_network_alpha": str(config.lora_alpha),
        "ss_base_model_version": family.name,
    }
    save_file(tensors, str(path), metadata=metadata)
    canonical_safetensors(path)
    return path.name


# ------------------------------------------------------------------------------------- import


def read_adapter(
    path: Path, pipeline_class: type, unet_config: Any = None, state: dict | None = None
) -> tuple[dict, Any, Any]:
    """(state dict in diffusers names, kohya alphas or None, metadata) of a LoRA file, read by
    diffusers as `load_lora_weights` reads it (with the UNet's config, which maps the SGM block
    names of SDXL kohya files); `state`: the file's tensors already read (the preflight's)."""
    if not path.is_file():
        raise UserError(f"train.init_lora {path} is not a file.")
    kwargs = {"unet_config": unet_config} if unet_config is not None else {}
    try:
        source = str(path) if state is None else state
        return pipeline_class.lora_state_dict(source, return_lora_metadata=True, **kwargs)
    except (ValueError, KeyError, OSError) as exc:
        raise UserError(
            f"train.init_lora {path} is not a LoRA file diffusers can read ({exc}); give a "
            "diffusers (pytorch_lora_weights.safetensors) or kohya-format .safetensors LoRA."
        ) from None


def load_unet_adapter(path: Path, pipeline_class: type, unet, text_trained: bool) -> None:
    """Inject the UNet adapter of a LoRA file (diffusers or kohya format) into `unet` as adapter
    `default`, its rank and alpha from the file; refuse a file that fits none of its modules, and
    one with text-encoder adapters a run with frozen text encoders would silently drop."""
    state, alphas, metadata = read_adapter(path, pipeline_class, unet.config)
    check_parts(path, state, text_trained)
    _load(path, "unet", lambda: pipeline_class.load_lora_into_unet(
        state, alphas, unet, adapter_name="default", metadata=metadata), unet, state)  # fmt: skip
    _mark_trainable(unet)


def load_text_adapter(path: Path, pipeline_class: type, encoder, index: int) -> bool:
    """Inject the file's adapter of text encoder `index` (if it has one) into `encoder`."""
    state, alphas, metadata = read_adapter(path, pipeline_class)
    part = TEXT_PARTS[index]
    if not any(k.startswith(f"{part}.") for k in state):
        return False
    _load(path, part, lambda: pipeline_class.load_lora_into_text_encoder(
        state, alphas, encoder, prefix=part, adapter_name="default", metadata=metadata),
        encoder, state)  # fmt: skip
    _mark_trainable(encoder)
    return True


def _mark_trainable(module) -> None:
    for name, param in module.named_parameters():
        param.requires_grad_("lora_" in name)


def check_parts(path: Path, state: dict, text_trained: bool) -> None:
    """Refuse an adapter file without a UNet adapter, and one with text-encoder adapters that a
    run with frozen text encoders would silently drop."""
    if not any(k.startswith("unet.") for k in state):
        found = sorted({k.split(".")[0] for k in state})
        raise UserError(
            f"train.init_lora {path} has no UNet adapter (found parts: {found}); give a LoRA "
            "trained for this model family (kohya lora_unet_* or diffusers unet.* keys)."
        )
    text = sorted({k.split(".")[0] for k in state if k.startswith(TEXT_PARTS)})
    if text and not text_trained:
        raise UserError(
            f"train.init_lora {path} also adapts the text encoder(s) ({', '.join(text)}), but "
            "train.text_encoder is not 'lora', so those adapters would be dropped: set "
            "train.text_encoder: lora to train them too, or give a UNet-only adapter."
        )


def _load(path: Path, part: str, load, module, state: dict) -> None:
    expected = [k for k in state if k.startswith(f"{part}.")]
    if not expected:
        return
    try:
        load()
    except (ValueError, RuntimeError) as exc:  # no such module; a module of another shape
        detail = f"fails to load ({str(exc).splitlines()[0]}; e.g. {expected[0]!r})"
        raise UserError(mismatch(path, part, detail)) from None
    loaded = (
        len(get_peft_model_state_dict(module))
        if "default" in getattr(module, "peft_config", {})
        else 0
    )
    if loaded < len(expected):
        detail = f"loads {loaded} of {len(expected)} weights (e.g. {expected[0]!r})"
        raise UserError(mismatch(path, part, detail))


def mismatch(path: Path, part: str, detail: str, base: str = "the base model") -> str:
    return (
        f"train.init_lora {path} does not fit {base}: its {part} adapter {detail}. Was it "
        "trained for another base or family? Use a LoRA trained on this base, or set "
        "model.pretrained to the base it was trained on."
    )
