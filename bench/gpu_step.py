"""Training-step throughput and peak GPU memory of a profile, on the real UNet or transformer.

    python bench/gpu_step.py --profile sd15-lora-12gb [--steps 20] [--batch-size N]
    python bench/gpu_step.py --profile sd15-finetune-24gb --memory-options
    python bench/gpu_step.py --profile sd15-finetune-24gb --speed-options [--with-compile]
    python bench/gpu_step.py --profile sdxl-lora-24gb        # SDXL UNet, LoRA, 1024 px
    python bench/gpu_step.py --profile sdxl-finetune-80gb    # SDXL UNet, full + EMA, 1024 px
    python bench/gpu_step.py --profile sdxl-lora-24gb --build-only   # parameter count, no step
    python bench/gpu_step.py --profile flux-dev-lora-24gb --build-only   # + training-state memory
    python bench/gpu_step.py --profile sd35-medium-lora-24gb   # SD 3.5 / Flux: bench/flow_step.py

Builds the UNet of the profile's base model FROM CONFIG with random weights (no download: the SD 1.5,
SD 2.1 and SDXL base architectures are written out below; SDXL's takes random pooled embeddings and
its 1024 px size conditioning), applies the profile's training mode (LoRA or full),
mixed precision, gradient checkpointing and EMA, and runs sdflow's own training step
(`sdflow.training.objective.diffusion_loss`) on latent-shaped random inputs at the profile's resolution. Prints
images/s and the peak GPU memory, also as one JSON line. `--memory-options` measures each
combination of the memory options (`train.optimizer` adamw / adamw8bit, `train.ema_on_cpu`, EMA
on) one after another, one line each; the 8-bit optimizer only where CUDA is present.
`--speed-options` measures the speed keys one at a time and all together (`train.channels_last`,
`train.attention: sdpa`, `train.fused_adamw: false` (foreach, against the fused default),
`train.tf32`; `train.compile` with `--with-compile`,
or on CUDA). On a machine without a GPU it runs on the CPU (`--profile tiny-test --resolution 32
--steps 2 --set train.mixed_precision=no` smoke-tests the code path).
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch
from diffusers import DDPMScheduler

from sdflow.models.trainable import build_trainable_denoiser
from sdflow.profiles import load_profile
from sdflow.training.loop import WEIGHT_DTYPES, make_accelerator
from sdflow.training.memory import make_ema
from sdflow.training.objective import diffusion_loss
from sdflow.training.optimizers import check_optimizer, make_optimizer
from sdflow.training.speed import (
    apply_tf32,
    check_speed_options,
    compile_unet,
    fused_adamw,
    prepare_unet,
)

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD21_UNET = dict(
    SD15_UNET,
    sample_size=96,
    cross_attention_dim=1024,
    attention_head_dim=[5, 10, 20, 20],
    use_linear_projection=True,
)
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + the 1280-d pooled embedding
)
TEXT_LENGTH = 77
# The flow families' transformers (their transformer/config.json), counted by --build-only.
SD35_MEDIUM = dict(  # stabilityai/stable-diffusion-3.5-medium: MMDiT-X, dual attention in 0..12
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
    qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
)  # fmt: skip
SD35_LARGE = dict(  # stabilityai/stable-diffusion-3.5-large
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
    attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
    caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
    qk_norm="rms_norm",
)  # fmt: skip
FLUX_DEV = dict(  # black-forest-labs/FLUX.1-dev
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
TRANSFORMERS = {  # a name in model.pretrained -> (diffusers class, config)
    "flux.1": ("FluxTransformer2DModel", FLUX_DEV),
    "stable-diffusion-3.5-large": ("SD3Transformer2DModel", SD35_LARGE),
    "stable-diffusion-3.5-medium": ("SD3Transformer2DModel", SD35_MEDIUM),
}


def transformer_config(config) -> tuple[str, dict] | None:
    """The flow profile's transformer (class name, config), or None for a UNet profile."""
    name = (config.model.pretrained or "").lower()
    return next((found for key, found in TRANSFORMERS.items() if key in name), None)


def transformer_weights(class_name: str, architecture: dict) -> dict[str, int]:
    """The transformer's parameters and the weights its checkpoint holds (parameters and
    persistent buffers: SD3's positional embedding), built on the meta device."""
    import diffusers

    with torch.device("meta"):  # buffers too: SD3's positional embedding is 0.2B values
        model = getattr(diffusers, class_name)(**architecture)
    parameters = sum(p.numel() for p in model.parameters())
    return {"params": parameters, "weights": sum(t.numel() for t in model.state_dict().values())}


def unet_config(config) -> dict:
    """The profile's UNet architecture: its own for scratch, SD 1.5 / 2.1 for those bases."""
    if config.model.init == "scratch":
        return dict(config.model.unet)
    name = (config.model.pretrained or "").lower()
    if config.model.family == "sdxl" or "xl" in name:
        return SDXL_UNET
    return SD21_UNET if "2-1" in name or "2.1" in name or "sd21" in name else SD15_UNET


class RandomLatents:
    """Latent-shaped inputs with the interface of sdflow's cached-latent batch source."""

    scaling_factor = 0.18215
    shift_factor = 0.0  # SD's VAE has none

    def __init__(self, channels: int, size: int, text_dim: int, pooled_dim: int | None = None):
        self.shape = (channels, size, size)
        self.empty_prompt = torch.zeros(TEXT_LENGTH, text_dim)
        self.text_dim = text_dim
        self.pooled_dim = pooled_dim  # SDXL: the pooled text embedding's size; None for SD

    def batch(self, size: int) -> dict:
        return {
            "id": [str(i) for i in range(size)],
            "mean": torch.randn(size, *self.shape),
            "std": torch.full((size, *self.shape), 0.05),
            "text": torch.randn(size, TEXT_LENGTH, self.text_dim),
        }

    def latent_dist(self, batch: dict, flip: torch.Tensor):
        return batch["mean"], batch["std"]

    def text(self, batch: dict) -> torch.Tensor:
        return batch["text"]

    def added_conditioning(self, batch: dict, drop: torch.Tensor) -> dict | None:
        """SDXL: a random pooled embedding and the square crop's size conditioning."""
        if self.pooled_dim is None:
            return None
        size = len(batch["id"])
        pixels = self.shape[-1] * 8
        ids = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]], dtype=torch.float32)
        return {"text_embeds": torch.randn(size, self.pooled_dim), "time_ids": ids.expand(size, 6)}


def pooled_dim(architecture: dict) -> int | None:
    """SDXL-style UNets (`addition_embed_type: text_time`) take a pooled text embedding of this
    size beside the 6 time ids; None for SD."""
    if architecture.get("addition_embed_type") != "text_time":
        return None
    time_ids = 6 * architecture["addition_time_embed_dim"]
    return architecture["projection_class_embeddings_input_dim"] - time_ids


def parameter_count(architecture: dict) -> int:
    """The UNet's parameters, built on the meta device (no memory, no weights)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**architecture)
    return sum(p.numel() for p in unet.parameters())


def main() -> None:
    args = _arguments()
    config = load_profile(args.profile, args.overrides)
    flow = transformer_config(config)
    if args.build_only and flow is not None:
        from flow_memory import build, state_bytes  # bench/, beside this script

        counts = transformer_weights(*flow)
        memory = state_bytes(config, build(*flow, config))
        print(json.dumps({"profile": args.profile, "transformer": flow[0], **counts, **memory}))
        return
    if flow is not None:
        _print(measure_flow_profile(config, flow, args))
        return
    if args.build_only:
        architecture = unet_config(load_profile(args.profile, args.overrides))
        print(json.dumps({"profile": args.profile, "unet_params": parameter_count(architecture)}))
        return
    variants = {"as configured": []}
    if args.memory_options:
        variants = memory_variants(torch.cuda.is_available())
    elif args.speed_options:
        variants = speed_variants(torch.cuda.is_available() or args.with_compile)
    results = []
    for name, overrides in variants.items():
        variant = load_profile(args.profile, [*args.overrides, *overrides])
        result = measure(variant, args)
        result["variant"] = name
        results.append(result)
        _print(result)
    if len(results) > 1 and not torch.cuda.is_available():
        print("(no CUDA: adamw8bit variants skipped, peak GPU memory not measured)")


def measure_flow_profile(config, flow: tuple[str, dict], args) -> dict:
    """Images/s and peak GPU memory of the flow profile's transformer (`bench/flow_step.py`)."""
    from flow_step import flow_training_step  # bench/, beside this script

    class_name, architecture = flow
    architecture = {**architecture, **args.transformer}  # --transformer: a smaller one on a CPU
    accelerator = make_accelerator(config.train, _scratch_dir())
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    dtype = WEIGHT_DTYPES[accelerator.mixed_precision]
    step, params = flow_training_step(config, class_name, architecture, args, accelerator, dtype)
    seconds, loss = timed(step, args)
    batch_size = args.batch_size or config.train.batch_size
    resolution = args.resolution or config.download.resolution
    result = _report(args, config, batch_size, resolution, params, seconds, loss)
    result |= {"transformer": class_name, "quantize_applied": False, "variant": "as configured"}
    return result


def memory_variants(cuda: bool) -> dict[str, list[str]]:
    """The memory options on and off (EMA on in all, so its placement is what differs)."""
    variants = {
        "adamw, EMA on the GPU": ["train.ema=true"],
        "adamw, EMA on the CPU": ["train.ema=true", "train.ema_on_cpu=true"],
    }
    if cuda:  # bitsandbytes' 8-bit AdamW needs CUDA
        variants["adamw8bit, EMA on the GPU"] = ["train.ema=true", "train.optimizer=adamw8bit"]
        variants["adamw8bit, EMA on the CPU"] = [
            "train.ema=true",
            "train.optimizer=adamw8bit",
            "train.ema_on_cpu=true",
        ]
    return variants


def speed_variants(compile_too: bool) -> dict[str, list[str]]:
    """Each speed key alone, then all of them (compile only where it is wanted: slow on a CPU)."""
    keys = {
        "channels_last": "train.channels_last=true",
        "sdpa attention": "train.attention=sdpa",
        "foreach AdamW": "train.fused_adamw=false",
        "tf32": "train.tf32=true",
    }
    if compile_too:
        keys["compile"] = "train.compile=true"
    return {"baseline": [], **{k: [v] for k, v in keys.items()}, "all": list(keys.values())}


def measure(config, args) -> dict:
    """Images/s and peak GPU memory of `args.steps` training steps of the profile's UNet."""
    train = config.train
    batch_size = args.batch_size or train.batch_size
    resolution = args.resolution or config.download.resolution
    check_optimizer(train)
    accelerator = make_accelerator(train, _scratch_dir())
    check_speed_options(train, accelerator.device)
    apply_tf32(train, accelerator.device)
    architecture = unet_config(config)
    # sdflow's own UNet set-up (LoRA adapters, frozen weights in the compute dtype, checkpointing),
    # with the architecture built from config instead of loaded: random weights, no download.
    config.model.unet = architecture
    config.model.text_encoder = {"hidden_size": architecture["cross_attention_dim"]}
    dtype = WEIGHT_DTYPES[accelerator.mixed_precision]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    unet = prepare_unet(build_trainable_denoiser(config, SimpleNamespace(unet=None), dtype), train)
    compile_unet(unet, train)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = make_optimizer(train, params, fused_adamw(train, accelerator.device))
    unet, optimizer = accelerator.prepare(unet, optimizer)
    ema = make_ema(train, params)
    if ema and not train.ema_on_cpu:
        ema.to(accelerator.device)
    # unset means the base model's own; the bench builds its UNet from config, so epsilon
    prediction = train.prediction_type or "epsilon"
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", prediction_type=prediction)
    source = RandomLatents(
        architecture["in_channels"],
        resolution // 8,
        architecture["cross_attention_dim"],
        pooled_dim(architecture),
    )
    generator = torch.Generator().manual_seed(0)

    def step() -> float:
        loss = diffusion_loss(
            unet, scheduler, source, source.batch(batch_size), generator, train, accelerator.device
        )
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema:
            ema.step(params)
        return float(loss)

    seconds, loss = timed(step, args)
    result = _report(args, config, batch_size, resolution, params, seconds, loss)
    accelerator.free_memory()  # the next variant measures its own peak
    return result


def timed(step, args) -> tuple[float, float]:
    """Seconds of `args.steps` calls of `step` after `args.warmup` untimed ones, and the last loss."""
    for _ in range(args.warmup):
        step()
    _sync()
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    _sync()
    return time.perf_counter() - started, loss


def _report(args, config, batch_size, resolution, params, seconds, loss) -> dict:
    return {
        "profile": args.profile,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "mode": config.train.mode,
        "mixed_precision": config.train.mixed_precision,
        "gradient_checkpointing": config.train.gradient_checkpointing,
        "ema": config.train.ema,
        "ema_on_cpu": config.train.ema_on_cpu,
        "optimizer": config.train.optimizer,
        "speed": {
            key: getattr(config.train, key)
            for key in ("channels_last", "attention", "fused_adamw", "tf32", "compile")
        },
        "resolution": resolution,
        "batch_size": batch_size,
        "trainable_params": sum(p.numel() for p in params),
        "steps": args.steps,
        "images_per_second": round(batch_size * args.steps / seconds, 2),
        "peak_gpu_memory_gib": (
            round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if torch.cuda.is_available()
            else None
        ),
        "final_loss": round(loss, 4),
    }


def _print(result: dict) -> None:
    print(
        f"{result['profile']} ({result.get('variant')}): {result['images_per_second']} images/s "
        f"at {result['resolution']} px, batch {result['batch_size']}, peak GPU memory "
        f"{result['peak_gpu_memory_gib']} GiB on {result['device']}"
    )
    print(json.dumps(result))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _scratch_dir():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="sdflow-gpu-step-"))


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="sd15-lora-12gb")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the profile's")
    parser.add_argument("--resolution", type=int, default=None, help="default: the profile's")
    parser.add_argument(
        "--memory-options", action="store_true",
        help="measure with and without 8-bit AdamW and EMA on the CPU (EMA on in each)",
    )  # fmt: skip
    parser.add_argument(
        "--speed-options", action="store_true",
        help="measure each speed key (channels_last, sdpa, foreach AdamW, TF32) and all together",
    )  # fmt: skip
    parser.add_argument(
        "--build-only", action="store_true",
        help="only build the profile's UNet architecture on the meta device; print its size",
    )  # fmt: skip
    parser.add_argument(
        "--with-compile", action="store_true", help="--speed-options: torch.compile too (CPU)"
    )
    parser.add_argument(
        "--transformer", type=json.loads, default={}, metavar="JSON",
        help='flow profiles: override the transformer config, e.g. \'{"num_layers": 1}\' on a CPU',
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="K=V",
        help="override the profile, e.g. --set train.mixed_precision=no on a CPU",
    )  # fmt: skip
    return parser.parse_args()


if __name__ == "__main__":
    main()
