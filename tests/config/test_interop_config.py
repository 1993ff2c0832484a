"""The interop keys (train.export_formats, export_dtype, init_lora; model.config) fail early with
errors that name the key, the value and what is allowed."""

from __future__ import annotations

import pytest

from sdflow.profiles import ConfigError, load_profile


def profile(*overrides: str):
    return load_profile("tiny-test", list(overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.export_formats=[kohya]"], r"'kohya' but train.mode is 'full'.*single_file"),
        (["train.mode=lora", "train.export_formats=[single_file]"], r"'single_file'.*kohya"),
        (["train.export_formats=[onnx]"], r"export_formats"),
        (["train.export_dtype=int8"], r"export_dtype"),
        (["train.init_lora=/x/lora.safetensors"], r"init_lora .* train.mode is 'full'"),
        (
            ["model.init=pretrained", "model.pretrained=/x/base.safetensors"],
            r"single file but model.config is not set",
        ),
        (
            ["model.init=pretrained", "model.pretrained=/x/base", "model.config=/x/c"],
            r"model.config is '/x/c' but model.pretrained is not a single file",
        ),
    ],
)
def test_bad_interop_settings_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        profile(*overrides)


def test_diffusers_is_always_among_the_export_formats():
    train = profile("train.export_formats=[single_file]").train
    assert train.export_formats == ["diffusers", "single_file"]
    assert profile().train.export_formats == ["diffusers"]
