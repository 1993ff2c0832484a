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
