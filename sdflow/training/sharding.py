"""Sharded full fine-tunes (`train.sharding: fsdp`): FSDP2 `fully_shard` through accelerate's plugin.

`accelerator_options(train)` adds accelerate's `FullyShardedDataParallelPlugin(fsdp_version=2)` to
the Accelerator's arguments: the UNet's blocks (diffusers' `_no_split_modules`) and the root are each
sharded over all processes (`full`), or within a node and replicated across nodes (`hybrid`, a 2-D
device mesh through accelerate's ParallelismConfig); `fsdp_cpu_offload` keeps the shards in host
memory. One process in all trains unsharded: there is nothing to shard over.

accelerate runs FSDP on GPUs only; on a CPU host (gloo) `allow_cpu_fsdp` switches its state to FSDP
by hand after the fact, which FSDP2 itself supports (DTensor shards on a gloo device mesh). That is how
the tests run it; a GPU never needs it.

Checkpoints stay the unsharded format: `full_state` gathers the full UNet weights and optimizer
state on every checkpoint (a collective: every rank calls it) and rank 0 writes them with index-keyed
optimizer state, exactly what an unsharded run writes. So exports, the single-file export and a
resume on any number of processes or nodes, sharded or not, read the same files;
`load_sharded_optimizer` puts such a state back into the sharded optimizer after `prepare`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

from sdflow.config import TrainConfig


def world_size() -> int:
    """Processes in all, as torchrun says (1 in the stage's own process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def sharded(train: TrainConfig) -> bool:
    return train.sharding == "fsdp" and world_size() > 1


def accelerator_options(train: TrainConfig) -> dict[str, Any]:
    """Accelerator keyword arguments for `train.sharding` (none: nothing to add)."""
    if not sharded(train):
        return {}
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=True,
        auto_wrap_policy="transformer_based_wrap",  # the model's _no_split_modules
        state_dict_type="FULL_STATE_DICT",
        cpu_offload=train.fsdp_cpu_offload,
        cpu_ram_efficient_loading=False,
    )
    options: dict[str, Any] = {"fsdp_plugin": plugin}
    if train.fsdp_strategy == "hybrid":
        from accelerate.parallelism_config import ParallelismConfig

        per_node = world_size() // train.nodes
        options["parallelism_config"] = ParallelismConfig(
            dp_replicate_size=train.nodes, dp_shard_size=per_node
        )
    return options


def allow_cpu_fsdp(accelerator: Accelerator, train: TrainConfig) -> None:
    """On gloo CPU processes, turn accelerate's plain multi-CPU state into FSDP (see the module doc)."""
    state = AcceleratorState()
    if sharded(train) and state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = accelerator_options(train)["fsdp_plugin"]


def full_state(
    accelerator: Accelerator, model: torch.nn.Module, optimizer, names: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full trained weights and index-keyed optimizer state (on rank 0; collective)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)  # accelerate's gives DTensor shards
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if not accelerator.is_main_process:
        return {}, {}
    index = {name: i for i, name in enumerate(names)}
    optim = {
        "state": {index[n]: v for n, v in by_name["state"].items()},
        "param_groups": [
            {**group, "params": [index[n] for n in group["params"]]}
            for group in by_name["param_groups"]
        ],
    }
    return {n: weights[n] for n in names}, optim


def load_sharded_optimizer(model: torch.nn.Module, optimizer, values: dict, names: list[str]):
    """An index-keyed (unsharded) optimizer state into the sharded optimizer, after `prepare`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    by_name = {
        "state": {names[int(i)]: v for i, v in values["state"].items()},
        "param_groups": [
            {**group, "params": [names[int(i)] for i in group["params"]]}
            for group in values["param_groups"]
        ],
    }
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, optimizer, by_name, options=options)
