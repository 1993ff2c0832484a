"""bench/flow_memory.py: the training state of the new Flux profiles, from the real transformer on the
meta device. The parameter count is Flux.1 dev's published 11,901,408,320; the byte counts are
recomputed here from the shapes by the formats' own definitions (bf16 2 bytes, NF4 4 bits plus one
8-bit absmax per 64 and one float32 per 64 x 256 weights, Adafactor's rows + columns)."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest

from sdflow.profiles import load_profile

BENCH = Path(__file__).resolve().parents[2] / "bench"
FLUX_DEV = 11_901_408_320


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCH))  # the bench imports its neighbours by plain name
        yield importlib.import_module("gpu_step"), importlib.import_module("flow_memory")


def built(bench, profile: str, *overrides: str):
    gpu_step, memory = bench
    config = load_profile(profile, list(overrides))
    model = memory.build(*gpu_step.transformer_config(config), config)
    return model, memory.state_bytes(config, model)


def test_the_full_finetune_fits_80gb_only_with_bf16_master_weights(bench):
    model, state = built(bench, "flux-dev-finetune-80gb")
    assert state["trained_params"] == FLUX_DEV
    assert state["trained_weights_gb"] == state["gradients_gb"] == 2 * FLUX_DEV / 1e9
    factored = sum(4 * (p.shape[0] + p.shape[1]) if p.ndim == 2 else 4 * p.numel()
                   for p in model.parameters())  # fmt: skip
    assert state["optimizer_state_gb"] == pytest.approx(factored / 1e9)
    assert state["total_gb"] < 50  # + activations and CUDA context: an 80 GB GPU
    _, mixed = built(bench, "flux-dev-finetune-80gb", "train.master_weights=float32")
    assert mixed["total_gb"] > 95  # float32 master weights and gradients alone: no 80 GB GPU


def test_the_nf4_lora_base_takes_a_quarter_of_the_bf16_one(bench):
    model, state = built(bench, "flux-dev-lora-24gb")
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    assert sum(p.numel() for _, p in frozen) == FLUX_DEV
    linear = sum(p.numel() for n, p in frozen if p.ndim == 2 and n.endswith(".weight"))
    nf4 = linear * (4 + 8 / 64 + 32 / (64 * 256)) / 8 + (FLUX_DEV - linear) * 2
    assert state["frozen_weights_gb"] == pytest.approx(nf4 / 1e9)
    rank = load_profile("flux-dev-lora-24gb").train.lora_rank
    adapters = [m for m in model.modules() if hasattr(m, "lora_A")]
    expected = sum(rank * (m.in_features + m.out_features) for m in adapters)
    assert state["trained_params"] == expected
    assert math.isclose(state["frozen_weights_gb"], 6.14, abs_tol=0.01)  # vs 23.8 GB in bf16
