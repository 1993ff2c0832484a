"""The exports a train stage writes beside its diffusers output (`train.export_formats`).

Every format is written from the same weights: the single file from the saved diffusers folder
(loaded back, so it equals what `from_pretrained` gives), the kohya LoRA from the trained adapter
modules. Names are the diffusers output's plus a suffix, in the stage directory:
`pipeline.safetensors` (+ `pipeline.yaml` for v-prediction SD), `lora-kohya.safetensors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdflow.errors import UserError
from sdflow.models.formats.kohya import export_kohya
from sdflow.models.formats.single_file import export_single_file

EXPORT_FILES = ("single_file", "single_file_config", "kohya_lora")  # the manifest's export names


def write_exports(
    formats: list[str], family: Any, model_dir: Path, dtype: str, unet=None, encoders=()
) -> dict[str, str]:
    """The extra formats of one exported model (a diffusers folder `model_dir`), by format name
    (`single_file`, `single_file_config`, `kohya_lora`), relative to the stage directory."""
    missing = [f for f in formats if f not in family.export_formats]
    if missing:
        raise UserError(
            f"train.export_formats has {missing} but the {family.name!r} family writes "
            f"{list(family.export_formats)}."
        )
    files: dict[str, str] = {}
    if "single_file" in formats:
        pipe = family.pipeline_class.from_pretrained(model_dir, **family.load_kwargs())
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family.name == "sdxl" else [])
        layout = family.single_file_layout(_text(pipe, encoders))
        path = model_dir.parent / f"{model_dir.name}.safetensors"
        prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        parts = (pipe.unet, pipe.vae, encoders)
        written = export_single_file(path, layout, parts, dtype, prediction, model_dir.name)
        files["single_file"] = written[0]
        if len(written) > 1:
            files["single_file_config"] = written[1]
    if "kohya" in formats:
        path = model_dir.parent / f"{model_dir.name}-kohya.safetensors"
        files["kohya_lora"] = export_kohya(path, unet, list(encoders), family, dtype)
    return files


def _text(pipe, encoders: list[Any]):
    from sdflow.models.families import TextEncoders

    return TextEncoders([pipe.tokenizer], encoders)
