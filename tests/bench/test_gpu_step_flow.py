"""bench/gpu_step.py --build-only builds the flow profiles' real transformers from config on the meta
device; their sizes are the published ones: Flux.1 dev 11,901,408,320 parameters (its 23.8 GB bf16
transformer), SD 3.5 Large 8.1B and Medium 2.5B (the model cards' figures, which count the
checkpoint's weights: parameters and SD3's positional-embedding buffer; the bf16 files of 16.3 and
4.9 GB)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from sdflow.profiles import load_profile

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_step_flow", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("profile", "published"),
    [
        ("sd35-medium-lora-24gb", 2.5e9),
        ("sd35-large-lora-48gb", 8.1e9),
        ("flux-dev-lora-48gb", 11.9e9),
    ],
)
def test_flow_profiles_build_the_published_transformers(bench, profile, published):
    found = bench.transformer_config(load_profile(profile))
    assert found is not None
    counts = bench.transformer_weights(*found)
    assert round(counts["weights"] / 1e8) == round(published / 1e8)  # as the model card rounds
    if profile.startswith("flux"):
        assert counts["params"] == counts["weights"] == 11_901_408_320


TINY = {
    "sd35-medium-lora-24gb": {
        "num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2,
        "joint_attention_dim": 32, "caption_projection_dim": 16, "pooled_projection_dim": 16,
        "dual_attention_layers": [], "sample_size": 8, "pos_embed_max_size": 16,
    },
    "flux-dev-lora-48gb": {
        "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16,
        "axes_dims_rope": [4, 6, 6],
    },
}  # fmt: skip


@pytest.mark.parametrize("profile", sorted(TINY))
def test_the_timed_flow_step_trains_the_profiles_lora(bench, profile, monkeypatch):
    """The real architecture's shape, made small (on a CPU): one timed step of sdflow's flow
    objective trains exactly the LoRA that PEFT puts on the profile's targets."""
    from types import SimpleNamespace

    import diffusers

    from sdflow.models.adapters import adapter_config

    monkeypatch.syspath_prepend(str(BENCH.parent))  # bench/flow_step.py, as the script sees it
    config = load_profile(profile, ["train.mixed_precision=no", "model.max_sequence_length=8"])
    class_name, architecture = bench.transformer_config(config)
    architecture = {**architecture, **TINY[profile]}
    args = SimpleNamespace(
        steps=1, warmup=1, resolution=64, batch_size=1, profile=profile, transformer={}
    )
    result = bench.measure_flow_profile(config, (class_name, architecture), args)
    reference = getattr(diffusers, class_name)(**architecture)
    reference.add_adapter(adapter_config(config.train, list(config.train.lora_targets)))
    lora = sum(p.numel() for name, p in reference.named_parameters() if "lora_" in name)
    assert result["trainable_params"] == lora
    assert (result["transformer"], result["resolution"], result["steps"]) == (class_name, 64, 1)
