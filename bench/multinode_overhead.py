"""What launching through torchrun and sharding with FSDP cost on this CPU (docs/multinode.md).

    PYTHONPATH=. python bench/multinode_overhead.py /tmp/mn-bench

Trains the tests' tiny UNet on 12 cached latents for 20 steps at global batch 4: in the stage's
process, on 1 node x 2 torchrun processes, on 2 local nodes x 1, and with FSDP on 1 x 2. Prints
each run's wall time and loop time, FSDP's largest weight difference from DDP, and whether the two
DDP splits trained bitwise alike.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/fixtures

from fixtures.pipelines import build_tiny_sd  # noqa: E402
from fixtures.training import make_latents, scratch_config  # noqa: E402

from sdflow.store.checkpoints import load_checkpoint  # noqa: E402
from sdflow.training.processes import run_training  # noqa: E402

STEPS = 20
RUNS = {
    "in-process 1 x batch 4": ["train.batch_size=4"],
    "torchrun 1 node x 2 (DDP)": ["train.processes=2", "train.batch_size=2"],
    "torchrun 2 nodes x 1 (DDP)": ["train.nodes=2", "train.processes=1", "train.batch_size=2"],
    "torchrun 1 node x 2 (FSDP)": [
        "train.processes=2",
        "train.batch_size=2",
        "train.sharding=fsdp",
    ],
}


def timed_run(root: Path, components: dict, overrides: list[str]) -> tuple[float, float, dict]:
    """(wall s, loop s, final trained weights) of one `run_training` in a fresh workdir."""
    upstream = {"latents": make_latents(root, components), "autoencoder": None, "caption": None}
    steps = [f"train.max_steps={STEPS}", f"train.checkpoint_every={STEPS}", "train.log_every=10"]
    config = scratch_config(components, *steps, *overrides)
    started = time.monotonic()
    summary = run_training(config, upstream, str(root), root / "out")
    wall = time.monotonic() - started
    weights = load_checkpoint(root / "out" / "checkpoints" / f"step-{STEPS:06d}")[1]["model"]
    return wall, summary.samples_seen / summary.samples_per_second, weights


def main(root: Path) -> None:
    torch.set_num_threads(1)
    components = build_tiny_sd(root / "components")
    weights = {}
    for i, (name, overrides) in enumerate(RUNS.items()):
        wall, loop, weights[name] = timed_run(root / f"run{i}", components, overrides)
        print(
            f"{name}: wall {wall:.1f} s, training {loop:.2f} s ({loop / STEPS * 1e3:.0f} ms/step)"
        )
    ddp, fsdp = weights["torchrun 1 node x 2 (DDP)"], weights["torchrun 1 node x 2 (FSDP)"]
    diff = max((ddp[k] - fsdp[k]).abs().max().item() for k in ddp)
    largest = max(v.abs().max().item() for v in ddp.values())
    print(f"FSDP vs DDP after {STEPS} steps: max abs diff {diff:.3g}, max |w| {largest:.3g}")
    nodes = weights["torchrun 2 nodes x 1 (DDP)"]
    print("2 nodes x 1 == 1 node x 2 bitwise:", all(torch.equal(ddp[k], nodes[k]) for k in ddp))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path, help="a scratch directory for the runs")
    main(parser.parse_args().workdir)
