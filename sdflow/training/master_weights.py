"""Pure-bfloat16 full fine-tunes (`train.master_weights: bfloat16`): no float32 copy of the weights.

Mixed precision keeps float32 master weights and float32 gradients: 8 bytes per weight before the
optimizer's state, 95 GB for Flux's 11.9B. With bfloat16 master weights the model's weights and
gradients are bfloat16 (4 bytes per weight) and the optimizer steps one weight tensor at a time in
float32: the tensor and its gradient are widened, the optimizer updates it (its state is created in
float32 then: factored and small for Adafactor, 8 bytes per weight for AdamW), and the result is
rounded back to bfloat16 *stochastically*: up or down with the probability of its distance to each
neighbour, so an update far below bfloat16's resolution (2^-8 of the weight: a fine-tune's lr of
1e-5 moves a weight by about that much less) still moves the weight on average instead of being
rounded away every step (Zamirai et al. 2020, https://arxiv.org/abs/2010.06192).

The rounding noise is drawn from a generator seeded by (`train.seed`, the tensor's index, its own
step count kept in the optimizer's state), so a resumed run rounds exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MethodType

import torch
from torch import Tensor

STEP_KEY = "bf16_step"  # each tensor's step count, in the optimizer's (checkpointed) state


def stochastic_round(values: Tensor, generator: torch.Generator) -> Tensor:
    """float32 -> bfloat16, rounding up with probability (distance to the lower neighbour / ulp):
    random low 16 bits are added to the float32 bit pattern, which is then truncated."""
    bits = values.contiguous().view(torch.int32)
    noise = torch.randint(
        0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator
    )
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def step_in_float32(optimizer: torch.optim.Optimizer, seed: int) -> None:
    """Make `optimizer.step()` update its bfloat16 tensors in float32, one at a time, and round
    them back stochastically (float32 tensors step as before)."""
    step = optimizer.step

    def step_each(self: torch.optim.Optimizer, closure=None) -> None:
        _step_each(self, step, seed)

    # a bound method, as the lr scheduler's step tracking (`step.__func__`) expects
    optimizer.step = MethodType(step_each, optimizer)  # type: ignore[method-assign]
    _keep_float32_state(optimizer)


def _keep_float32_state(optimizer: torch.optim.Optimizer) -> None:
    """`load_state_dict` casts the loaded state to each weight's dtype (bfloat16 here), but it was
    made, and must stay, float32: after loading, the saved tensors replace the cast ones."""
    loading: list[dict] = []

    def keep(_, state_dict: dict) -> None:
        loading.append(state_dict)

    def restore(_) -> None:
        saved = loading.pop()
        for group, stored in zip(optimizer.param_groups, saved["param_groups"], strict=True):
            for param, index in zip(group["params"], stored["params"], strict=True):
                for key, value in saved["state"].get(index, {}).items():
                    if torch.is_tensor(value) and value.is_floating_point() and key != "step":
                        optimizer.state[param][key] = value.to(param.device)

    optimizer.register_load_state_dict_pre_hook(keep)
    optimizer.register_load_state_dict_post_hook(restore)


def _step_each(optimizer: torch.optim.Optimizer, step: Callable[[], object], seed: int) -> None:
    groups = [group["params"] for group in optimizer.param_groups]
    try:
        index = 0
        for which, params in enumerate(groups):
            for param in params:
                index += 1
                if param.grad is None:
                    continue
                for other, group in enumerate(optimizer.param_groups):  # only `param` steps
                    group["params"] = [param] if other == which else []
                _step_one(optimizer, step, param, seed * 1_000_003 + index)
    finally:
        for group, params in zip(optimizer.param_groups, groups, strict=True):
            group["params"] = params


def _step_one(optimizer, step: Callable[[], object], param: Tensor, seed: int) -> None:
    if param.dtype != torch.bfloat16:
        step()
        return
    param.data = param.data.float()
    param.grad = param.grad.float()
    step()
    state = optimizer.state[param]
    state[STEP_KEY] = state.get(STEP_KEY, 0) + 1
    generator = torch.Generator(param.device).manual_seed(seed * 1_000_003 + state[STEP_KEY])
    param.grad = None
    param.data = stochastic_round(param.data, generator)
