"""Model files checked before any work: a run's `train.init_lora` must fit its base.

The pipeline flow calls `check_model_files` before its first stage, so a LoRA trained for another
base (or family) stops the run with an error naming the file, what was found and what to do,
before anything is downloaded, converted or trained, and no earlier output is touched. With a
single-file base, the file's own checks come first (`check_single_file_base`: its keys must
match a family, the one of the `model.config` folder that describes it).

It is cheap: the LoRA's key names and shapes come from its safetensors header (only the `alpha`
scalars are read), its names go through diffusers' own reader (`lora_state_dict`, which the train
stage uses too) on meta tensors, and the base's denoiser and text encoders are built from their
configs on the meta device (no weights) for their module names and shapes. Every adapted module
must exist in the base with the same input and output sizes, as the train stage's load requires.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sdflow.errors import UserError

log = logging.getLogger(__name__)
TEXT_PARTS = ("text_encoder", "text_encoder_2")


def check_model_files(config: Any, only: list[str] | None = None) -> None:
    """Refuse a `train.init_lora` that does not fit the base, when the train stage takes part in
    the run (torch and diffusers are imported only then)."""
    train = config.train
    if (only and "train" not in only) or train.mode != "lora" or not train.init_lora:
        return
    check_init_lora(config)


def check_init_lora(config: Any) -> None:
    """The `train.init_lora` file fits the base: its parts, module names and shapes."""
    from sdflow.models.components import absolute_source
    from sdflow.models.families import family_of, get_family
    from sdflow.models.formats.kohya import check_parts, mismatch, read_adapter
    from sdflow.models.formats.single_file_base import check_single_file_base, is_single_file

    model, train = config.model, config.train
    path = Path(train.init_lora).expanduser()
    if is_single_file(model.pretrained):  # its configs (model.config) describe the LoRA's base
        family, source = get_family(check_single_file_base(model)), model.config
    else:
        family, source = family_of(config), model.pretrained
    source = absolute_source(source)
    if not hasattr(family.pipeline_class, "load_lora_into_unet"):
        raise UserError(
            f"train.init_lora {path} is set but the base {source} is a {family.name!r} model: "
            "sdflow starts LoRA runs from adapter files of SD 1.x / 2.x and SDXL bases; unset "
            "train.init_lora to train a new adapter."
        )
    try:
        base = BaseModules(source, family, model)
    except OSError as exc:  # a hub base not in the cache, offline: the train stage checks it
        log.warning("train.init_lora not checked before the run: %s", exc)
        return
    header = header_state(path) if path.suffix == ".safetensors" and path.is_file() else None
    state, _, _ = read_adapter(path, family.pipeline_class, base.unet.config, header)
    check_parts(path, state, train.text_encoder == "lora")
    where = f"the base model {source} (a {family.name!r} model)"
    parts = {key.split(".")[0] for key in state}
    for part in sorted(parts, key=lambda p: (p != "unet", p)):
        module = base.module(part)
        if module is None:
            raise UserError(mismatch(path, part, "is for a part this base does not have", where))
        layers = adapter_layers(state, part, module)
        if bad := misfits(layers, module):
            example, why = next(iter(bad.items()))
            detail = (
                f"names {len(bad)} of its {len(modules_of(layers))} modules that the base's "
                f"{part} lacks or has in another shape, e.g. {example!r} ({why})"
            )
            raise UserError(mismatch(path, part, detail, where))


class BaseModules:
    """The base's denoiser and text encoders built on the meta device from their configs."""

    def __init__(self, source: str, family: Any, model: Any):
        from diffusers import DiffusionPipeline

        from sdflow.models.components import load_revision

        self.source, self.family = source, family
        self.revision = load_revision(source, model)
        self.index = DiffusionPipeline.load_config(source, **self.revision)
        config = family.denoiser_class.load_config(
            source, subfolder=family.denoiser_part, **self.revision
        )
        self.unet = _on_meta(lambda: family.denoiser_class.from_config(config))

    def module(self, part: str) -> Any:
        """The base's `part` (unet or a text encoder), None when the base has none."""
        import transformers

        if part == "unet":
            return self.unet
        library, name = self.index.get(part) or (None, None)
        if part not in TEXT_PARTS or library != "transformers":
            return None
        cls = getattr(transformers, name)
        config = cls.config_class.from_pretrained(self.source, subfolder=part, **self.revision)
        return _on_meta(lambda: cls(config))


def _on_meta(build) -> Any:
    import torch

    with torch.device("meta"):
        return build()


def header_state(path: Path) -> dict[str, Any]:
    """A safetensors file's tensors as meta tensors of their shapes (read from the header), but
    the `alpha` scalars, which diffusers' reader reads the values of."""
    import torch
    from safetensors import safe_open

    state = {}
    with safe_open(str(path), framework="pt") as handle:
        names = list(handle.keys())  # a safe_open handle is not iterable
        for key in names:
            if key.endswith(".alpha"):
                state[key] = handle.get_tensor(key)
            else:
                state[key] = torch.empty(handle.get_slice(key).get_shape(), device="meta")
    return state


def adapter_layers(state: dict[str, Any], part: str, module: Any) -> dict[str, Any]:
    """The part's adapter weights in PEFT's names (`<module>.lora_A.weight`), converted as
    diffusers' `load_lora_into_unet` / `load_lora_into_text_encoder` convert them."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    layers = {k.removeprefix(f"{part}."): v for k, v in state.items() if k.startswith(f"{part}.")}
    if part in TEXT_PARTS:
        layers = convert_state_dict_to_peft(convert_state_dict_to_diffusers(layers))
        if module is not None and not hasattr(module, "text_model"):  # flattened CLIPTextModel
            layers = {k.removeprefix("text_model."): v for k, v in layers.items()}
    elif layers and "lora_A" not in next(iter(layers)):
        layers = convert_unet_state_dict_to_peft(layers)
    return layers


def modules_of(layers: dict[str, Any]) -> set[str]:
    return {key.partition(".lora_")[0] for key in layers if ".lora_" in key}


def misfits(layers: dict[str, Any], module: Any) -> dict[str, str]:
    """{adapted module: why it does not fit} for the modules `module` lacks or has in another
    shape (lora_A's inputs, lora_B's outputs)."""
    named = dict(module.named_modules())
    bad: dict[str, str] = {}
    for key, tensor in layers.items():
        name, _, rest = key.partition(".lora_")
        if rest[:2] not in ("A.", "B."):
            continue
        target = named.get(name)
        if target is None:
            bad[name] = "no such module in the base"
            continue
        side, have = ("inputs", tensor.shape[1]) if rest[0] == "A" else ("outputs", tensor.shape[0])
        want = _size(target, "in" if side == "inputs" else "out")
        if want is not None and want != have:
            bad[name] = f"{have} {side} in the file, {want} in the base"
    return bad


def _size(module: Any, side: str) -> int | None:
    """A Linear's in/out features or a convolution's in/out channels."""
    for name in (f"{side}_features", f"{side}_channels"):
        if isinstance(getattr(module, name, None), int):
            return getattr(module, name)
    return None
