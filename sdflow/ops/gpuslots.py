"""GPU slots bound to devices: a GPU stage holds one device's concurrency limit and runs on it.

`sdflow deploy --gpus N` creates the global concurrency limits `gpu-0` … `gpu-<N-1>` (one slot each)
beside the `gpu` tag limit. A GPU stage enters `gpu_slot()`: it takes the first free device limit
(waiting when all are busy), and for as long as it holds it
- `torch_device()` is `cuda:<i>` in this process (every thread: caption shards run in a pool), and
  `torch.cuda.set_device(i)` makes a bare `cuda` mean it in the stage's own thread (accelerate);
- `child_visible_devices()` is what `sdflow.ops.launch` puts in `CUDA_VISIBLE_DEVICES` for the training
  processes it launches, so each of them sees exactly that device.
Without device limits (plain `sdflow run` on its ephemeral API) or outside a Prefect run, it does
nothing. Prefect is imported only inside `gpu_slot`, so stage code may import this module freely.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

SLOT = re.compile(r"^gpu-(\d+)$")
POLL_SECONDS = 2.0

log = logging.getLogger("sdflow.ops.gpuslots")
_held: list[int] = []  # device index of the slot this process holds (innermost last)


def device_limit_name(index: int) -> str:
    return f"gpu-{index}"


@contextmanager
def gpu_slot(poll_seconds: float = POLL_SECONDS) -> Iterator[int | None]:
    """Hold the first free device slot for the block; yields its device index, or None (no slots)."""
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        yield None
        return
    names = device_limits()
    if not names:
        yield None
        return
    with _acquire(names, poll_seconds) as index:
        _held.append(index)
        previous = _set_torch_device(index)
        try:
            yield index
        finally:
            _held.pop()
            if previous is not None:
                _set_torch_device(previous)


def device_limits() -> list[str]:
    """The active `gpu-<i>` global concurrency limits on the server, by device index."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        limits = client.read_global_concurrency_limits(limit=200)
    names = [limit.name for limit in limits if limit.active and SLOT.match(limit.name)]
    return sorted(names, key=lambda name: int(SLOT.match(name)[1]))


def held_device() -> int | None:
    """The device index of the slot this process holds, if any."""
    return _held[-1] if _held else None


def torch_device() -> Any:
    """Where a stage puts its models: the held slot's GPU, else the default GPU, else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = held_device()
    if index is None or index >= torch.cuda.device_count():
        return torch.device("cuda")
    return torch.device("cuda", index)


def gpu_count() -> int:
    """GPUs a stage may use: 1 while it holds a slot, else every visible one."""
    import torch

    visible = torch.cuda.device_count()
    return min(visible, 1) if held_device() is not None else visible


def child_visible_devices(environ: dict[str, str] | None = None) -> str | None:
    """CUDA_VISIBLE_DEVICES for processes a slot holder launches: its one device, or None.

    Slot `i` is the i-th device this process sees, so an outer CUDA_VISIBLE_DEVICES is honoured.
    """
    index = held_device()
    if index is None:
        return None
    outer = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    devices = [d.strip() for d in outer.split(",")] if outer else []
    return devices[index] if index < len(devices) else str(index)


@contextmanager
def _acquire(names: list[str], poll_seconds: float) -> Iterator[int]:
    """Try each device limit without waiting; when all are busy, wait and try again."""
    waiting_since = None
    while True:
        for name in names:
            stack = ExitStack()
            if not _try_enter(stack, name):
                continue
            with stack:
                if waiting_since is not None:
                    waited = time.monotonic() - waiting_since
                    log.info("Got GPU slot %s after waiting %.1f s", name, waited)
                yield int(SLOT.match(name)[1])
            return
        if waiting_since is None:
            waiting_since = time.monotonic()
            log.info("Waiting for a GPU slot: %s all busy", ", ".join(names))
        time.sleep(poll_seconds)


def _try_enter(stack: ExitStack, name: str) -> bool:
    """Enter `name`'s concurrency slot on `stack`; False when the server says it is taken (423)."""
    import httpx
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    try:
        stack.enter_context(
            concurrency(
                name,
                occupy=1,
                strict=True,
                max_retries=0,  # one request: a busy device answers 423 at once
                holder=_holder(),
                raise_on_lease_renewal_failure=False,  # a blip must not kill hours of training
            )
        )
    except ConcurrencySlotAcquisitionError as exc:
        cause = exc.__cause__
        if isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 423:
            return False
        raise
    return True


def _holder() -> Any:
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    if context is None:
        return None
    return ConcurrencyLeaseHolder(type="task_run", id=context.task_run.id)


def _set_torch_device(index: int) -> int | None:
    """Make a bare `cuda` mean device `index` in this thread; returns the previous current device."""
    import torch

    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        return None
    previous = torch.cuda.current_device()
    torch.cuda.set_device(index)
    return previous
