"""Speed options of the train stage (the GPU paths users of diffusers' scripts expect).

- `train.channels_last`: the UNet's weights, and its noisy-latent input, in channels-last memory
  format (NHWC), which cuDNN's tensor-core convolutions prefer; the same maths.
- `train.attention`: `sdpa` sets diffusers' `AttnProcessor2_0` (PyTorch's
  `scaled_dot_product_attention`, flash / memory-efficient kernels on a GPU), `eager` the plain
  matmul-softmax `AttnProcessor`; `default` keeps the processor the model loads with.
- `train.fused_adamw`: torch's fused AdamW (one kernel over all weights). Unset, it is used where
  torch has the kernel for the device (CPU and CUDA in torch 2.x); true refuses, before any work, a
  device without one; false (or no kernel) runs AdamW `foreach` (batched over weights, torch's own
  choice on CUDA), never the per-weight Python loop torch picks on a CPU. Under fp16's GradScaler it
  is foreach too (accelerate cannot see a step the fused kernel skips; `true` is refused there).
- `train.tf32`: TF32 matmuls and cuDNN convolutions; only on CUDA (a no-op elsewhere, and the run
  records whether it applied).
- `train.compile`: `torch.compile` of the UNet in place (`nn.Module.compile`, so parameter names and
  checkpoints are unchanged); refused before any work where inductor cannot build here.
"""

from __future__ import annotations

import shutil

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from sdflow.config import TrainConfig
from sdflow.errors import UserError


def fused_adamw(train: TrainConfig, device: torch.device) -> bool:
    """Whether AdamW runs torch's fused kernel on `device` (see the module doc)."""
    if train.optimizer != "adamw" or train.fused_adamw is False:
        return False
    return device.type in _get_fused_kernels_supported_devices()


def check_speed_options(train: TrainConfig, device: torch.device) -> None:
    """Refuse, before any work, a speed option this host cannot run."""
    if train.fused_adamw and not fused_adamw(train, device):
        raise UserError(
            f"train.fused_adamw is true but torch {torch.__version__} has no fused AdamW for "
            f"{device.type!r} (it has: {', '.join(_get_fused_kernels_supported_devices())}): "
            "set train.fused_adamw false here."
        )
    if train.compile and device.type == "cpu" and not _cpu_compiler():
        raise UserError(
            "train.compile is true but torch.compile's inductor needs a C++ compiler on a CPU and "
            "none (c++, g++, clang++) is on PATH: install one or set train.compile false."
        )


def _cpu_compiler() -> str | None:
    return next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)


def apply_tf32(train: TrainConfig, device: torch.device) -> bool:
    """Allow TF32 matmuls and convolutions when asked and on CUDA; returns whether it applied."""
    if not train.tf32 or device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def prepare_unet(unet: torch.nn.Module, train: TrainConfig) -> torch.nn.Module:
    """Attention processor and memory format of the UNet (before `accelerator.prepare`)."""
    if train.attention == "sdpa":
        unet.set_attn_processor(AttnProcessor2_0())
    elif train.attention == "eager":
        unet.set_attn_processor(AttnProcessor())
    if train.channels_last:
        unet.to(memory_format=torch.channels_last)
    return unet


def compile_unet(unet: torch.nn.Module, train: TrainConfig) -> None:
    """`torch.compile` in place: the module, its parameter names and its state dict stay the same."""
    if train.compile:
        unet.compile()


def memory_format(train: TrainConfig) -> torch.memory_format:
    """The memory format of the UNet's image-shaped inputs."""
    return torch.channels_last if train.channels_last else torch.contiguous_format
