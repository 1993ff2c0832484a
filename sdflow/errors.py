"""Error kinds that decide how a failure is reported and whether it is retried.

A retry helps only when the world may be different next time (a network hiccup, a busy server, a
flaky disk read). Out-of-memory, a full disk, a read-only or forbidden path happen again on every
attempt: `as_user_error` turns them into a UserError with one paragraph saying what to change, and
user errors are never retried.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """Bad config, missing path, no data left: said in one paragraph, exit code 2, never retried."""


class TransientError(Exception):
    """Network or I/O trouble that a retry may fix."""


# What lowers a stage's memory, in the order worth trying.
MEMORY_ADVICE = {
    "train": "lower train.batch_size (train.gradient_accumulation keeps the global batch), turn on "
    "train.gradient_checkpointing, use train.mixed_precision bf16 or fp16, or train.mode lora",
    "autoencoder": "lower autoencoder.batch_size",
    "latents": "lower latents.batch_size, or set latents.mixed_precision to bf16 or fp16",
    "caption": "lower caption.batch_size, or set caption.dtype to float16 or bfloat16",
    "evaluate": "lower eval.batch_size",
}
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
NOT_ALLOWED = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}


def as_user_error(error: BaseException, stage: str) -> UserError | None:
    """The failure as a UserError when retrying cannot fix it, else None."""
    if isinstance(error, UserError):
        return error
    if _out_of_memory(error):
        advice = MEMORY_ADVICE.get(stage, "lower the stage's batch size")
        return UserError(
            f"The {stage} stage ran out of memory ({_first_line(error)}). A retry would fail the "
            f"same way; {advice}."
        )
    if isinstance(error, OSError) and error.errno is not None:
        path = error.filename or "its output"
        if error.errno in DISK_FULL:
            return UserError(
                f"The disk is full: the {stage} stage could not write {path}. Free space on that "
                "filesystem (`sdflow gc` removes unreferenced stage outputs), or move the workdir "
                "with --workdir DIR, then rerun."
            )
        if error.errno == errno.EROFS:
            return UserError(
                f"The {stage} stage could not write {path}: the filesystem is read-only. Use a "
                "writable workdir (--workdir DIR)."
            )
        if error.errno in NOT_ALLOWED:
            return UserError(
                f"The {stage} stage could not access {path}: {NOT_ALLOWED[error.errno]}. Fix the "
                "owner or permissions of that path, or use another workdir (--workdir DIR)."
            )
    return None


def _out_of_memory(error: BaseException) -> bool:
    """Host MemoryError, torch's OutOfMemoryError, or a RuntimeError saying so (CUDA, MPS, HIP)."""
    if isinstance(error, MemoryError):
        return True
    names = {cls.__name__ for cls in type(error).__mro__}
    return "OutOfMemoryError" in names or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
