"""bench/gpu_step.py builds the real UNet architectures of the GPU profiles (on the meta device:
no memory, no step); their sizes are the published models' parameter counts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sdflow.profiles import load_profile

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_step.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sdxl_profiles_bench_the_sdxl_base_unet():
    bench = load_bench()
    for profile in ("sdxl-lora-24gb", "sdxl-finetune-80gb"):
        architecture = bench.unet_config(load_profile(profile))
        # stabilityai/stable-diffusion-xl-base-1.0's UNet: 2,567,463,684 parameters
        assert bench.parameter_count(architecture) == 2_567_463_684
    # and SD 1.5's (stable-diffusion-v1-5 unet: 859,520,964) is still SD 1.5's
    assert bench.parameter_count(bench.unet_config(load_profile("sd15-lora-12gb"))) == 859_520_964
