"""What `sdflow check` reports about the machine, and the problems it can see before any work.

torch is imported only where a GPU driver is installed (`cuda_available`): on a CPU-only machine its
1-2 s import would be most of what `sdflow check` costs, to learn what the missing driver says.
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from sdflow.config import RunConfig

PACKAGES = (
    "torch", "diffusers", "transformers", "accelerate", "peft", "prefect", "torchmetrics",
    "clip-interrogator", "open-clip-torch", "prefect-dask",
)  # fmt: skip


def describe_environment(config: RunConfig) -> list[str]:
    """Lines for the user: versions, devices, and warnings about this profile on this machine."""
    lines = [f"python {platform.python_version()} on {platform.machine()}"]
    lines += [f"{name} {_version(name)}" for name in PACKAGES]
    lines += _devices()
    lines += [f"warning: {w}" for w in profile_warnings(config)]
    return lines


# Present wherever a CUDA (NVIDIA) or ROCm (AMD) driver is loaded; torch sees no GPU without them.
GPU_DRIVER_FILES = ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/kfd")


def cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch where no GPU driver or device is visible."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")
    if hidden or not any(Path(p).exists() for p in GPU_DRIVER_FILES):
        return False
    import torch

    return torch.cuda.is_available()


def profile_warnings(config: RunConfig) -> list[str]:
    warnings = []
    if not cuda_available():
        for key, value in (
            ("train.mixed_precision", config.train.mixed_precision),
            ("latents.mixed_precision", config.latents.mixed_precision),
        ):
            if value == "fp16":
                warnings.append(f"{key} is 'fp16' but no CUDA GPU is visible; use 'no' or 'bf16'")
    pretrained = config.model.pretrained
    local = config.model.init == "pretrained" and pretrained and _looks_local(pretrained)
    if local and not Path(pretrained).is_dir():
        warnings.append(f"model.pretrained {pretrained!r} is not a directory")
    return warnings


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).exists()


def _devices() -> list[str]:
    if not cuda_available():
        return ["device: CPU only (no CUDA GPU visible)"]
    import torch

    lines = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        lines.append(f"device cuda:{index}: {props.name}, {props.total_memory / 2**30:.1f} GiB")
    return lines


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "(not installed)"
