"""Time a training loop's steps and the share of them spent in the model's forward and backward.

    python bench/step_timer.py OUT.json SCRIPT [ARGS...]

Runs SCRIPT (e.g. diffusers' `examples/text_to_image/train_text_to_image.py`, given by path and run
as it is, unmodified) as `__main__` with ARGS, and writes to OUT.json what `StepTimer` recorded:
the time at the end of each optimizer step, and per step the seconds inside the denoiser's forward
(`UNet2DConditionModel.forward`) and inside `Accelerator.backward`. `bench/train_step.py
--reference-script PATH` runs it in a child process; the same `StepTimer` wraps sdflow's loop in
the bench's own process, so both sides are measured by the same code.
"""

from __future__ import annotations

import json
import runpy
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from unittest import mock

from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from diffusers import UNet2DConditionModel


@dataclass
class StepTimer:
    """Step ends and per-step forward / backward seconds, recorded by wrapping the classes."""

    ends: list[float] = field(default_factory=list)
    forward: list[float] = field(default_factory=list)
    backward: list[float] = field(default_factory=list)
    optimizer: list[float] = field(default_factory=list)
    _forward: float = 0.0
    _backward: float = 0.0

    def patches(self, step_owner=AcceleratedOptimizer, step_name: str = "step") -> ExitStack:
        """Wrap the UNet's forward, accelerate's backward and the step function (by default the
        optimizer's step: its end, with gradient accumulation 1, ends a training step)."""
        stack = ExitStack()
        stack.enter_context(mock.patch.object(UNet2DConditionModel, "forward", self._timed(
            UNet2DConditionModel.forward, "_forward")))  # fmt: skip
        stack.enter_context(mock.patch.object(Accelerator, "backward", self._timed(
            Accelerator.backward, "_backward")))  # fmt: skip
        stack.enter_context(
            mock.patch.object(step_owner, step_name, self._step_end(getattr(step_owner, step_name)))
        )
        return stack

    def _timed(self, function, slot: str):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                setattr(self, slot, getattr(self, slot) + time.perf_counter() - started)

        return wrapper

    def _step_end(self, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            result = function(*args, **kwargs)
            self.ends.append(time.perf_counter())
            self.optimizer.append(self.ends[-1] - started)
            self.forward.append(self._forward)
            self.backward.append(self._backward)
            self._forward = self._backward = 0.0
            return result

        return wrapper

    def summary(self, warmup: int) -> dict[str, float]:
        """Steady steps/s after step `warmup`; the shares of the step in the UNet's forward and
        backward, in the optimizer's step, and in everything else (data, noise, clipping, lr
        schedule, logging: the loop's own overhead)."""
        span = self.ends[-1] - self.ends[warmup - 1]
        forward, backward = sum(self.forward[warmup:]), sum(self.backward[warmup:])
        optimizer = sum(self.optimizer[warmup:])
        return {
            "steps_per_second": (len(self.ends) - warmup) / span,
            "forward_share": forward / span,
            "backward_share": backward / span,
            "outside_share": 1 - (forward + backward) / span,
            "optimizer_share": optimizer / span,
            "loop_share": 1 - (forward + backward + optimizer) / span,
        }

    def as_json(self) -> dict[str, list[float]]:
        return {
            "ends": self.ends,
            "forward": self.forward,
            "backward": self.backward,
            "optimizer": self.optimizer,
        }


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return
    out, script, *args = sys.argv[1:]
    timer = StepTimer()
    sys.argv = [script, *args]
    try:
        with timer.patches():
            runpy.run_path(script, run_name="__main__")
    finally:
        with open(out, "w") as fh:
            json.dump(timer.as_json(), fh)


if __name__ == "__main__":
    main()
