"""bench/gpu_step.py builds the real UNet architectures of the GPU profiles (on the meta device:
no memory, no step); their sizes are the published models' parameter counts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sdflow.profiles import load_profile

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu_step.py"


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


def test_an_sdxl_style_unet_steps_with_pooled_and_size_conditioning(monkeypatch, one_torch_thread):
    """The bench's SDXL step path (random pooled embeddings, time ids) on a tiny text_time UNet."""
    bench = load_bench()
    unet = ("{sample_size: 8, in_channels: 4, out_channels: 4, block_out_channels: [32, 64], "
            "layers_per_block: 1, "
            "down_block_types: [DownBlock2D, CrossAttnDownBlock2D], "
            "up_block_types: [CrossAttnUpBlock2D, UpBlock2D], attention_head_dim: [2, 4], "
            "cross_attention_dim: 64, norm_num_groups: 8, addition_embed_type: text_time, "
            "addition_time_embed_dim: 8, projection_class_embeddings_input_dim: 80}")  # fmt: skip
    argv = ["gpu_step.py", "--profile", "tiny-test", "--resolution", "32", "--steps", "1",
            "--warmup", "0", "--batch-size", "2", "--set", f"model.unet={unet}"]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    args = bench._arguments()
    config = load_profile(args.profile, args.overrides)
    assert bench.pooled_dim(bench.unet_config(config)) == 80 - 6 * 8
    result = bench.measure(config, args)
    assert result["images_per_second"] > 0 and result["final_loss"] > 0
