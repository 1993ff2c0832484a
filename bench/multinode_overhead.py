"""What launching through torchrun, its rendezvous, an elastic restart and FSDP cost on this CPU
(docs/multinode.md).

    PYTHONPATH=. nice -n 19 python bench/multinode_overhead.py /tmp/mn-bench [--four-processes]

Trains the tests' tiny UNet on 12 cached latents for 20 steps at global batch 4: in the stage's
process, on 1 node x 2 torchrun processes, on 2 local nodes x 1, on 2 x 1 with `max_restarts: 1`
whose node-1 worker is SIGKILLed after the checkpoint of step 10, and with FSDP on 1 x 2. Prints
each run's wall time and loop time; for torchrun runs, node 0's phases as its log shows them
(agent start, the c10d rendezvous, worker start to its first batch; LOGLEVEL=INFO makes the agents
log their rendezvous) and the restart's time from the kill to the resumed loop; FSDP's largest
weight difference from DDP; and whether the DDP splits, the restarted run included, trained
bitwise alike. `--four-processes` runs 1 node x 4 and 2 nodes x 2 instead (global batch 4, one
sample per process) and says whether they trained bitwise alike (too slow for `make test`).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/fixtures

from fixtures.pipelines import build_tiny_sd  # noqa: E402
from fixtures.training import make_latents, scratch_config  # noqa: E402

from sdflow.ops.launch import SUPERVISOR_ENV  # noqa: E402
from sdflow.ops.torchrun import NODE_ENV  # noqa: E402
from sdflow.store.checkpoints import load_checkpoint  # noqa: E402
from sdflow.training.processes import run_training  # noqa: E402

STEPS, KILL_AT = 20, 10
TWO_NODES = ["train.nodes=2", "train.processes=1", "train.batch_size=2"]
RUNS = {
    "in-process 1 x batch 4": ["train.batch_size=4"],
    "torchrun 1 node x 2 (DDP)": ["train.processes=2", "train.batch_size=2"],
    "torchrun 2 nodes x 1 (DDP)": TWO_NODES,
    "torchrun 2 nodes x 1, worker killed, restarted": [*TWO_NODES, "train.max_restarts=1"],
    "torchrun 1 node x 2 (FSDP)": [
        "train.processes=2",
        "train.batch_size=2",
        "train.sharding=fsdp",
    ],
}
FOUR = {
    "torchrun 1 node x 4 (DDP)": ["train.processes=4", "train.batch_size=1"],
    "torchrun 2 nodes x 2 (DDP)": ["train.nodes=2", "train.processes=2", "train.batch_size=1"],
}
# node 0's log lines that end each phase (the supervisor logs node 0's lines without a prefix)
PHASES = {
    "agent start": re.compile(r"\[default\] Rendezvous'ing worker group"),
    "rendezvous": re.compile(r"\[default\] Rendezvous complete for workers"),
    "worker start to training": re.compile(r"^buckets: "),
}


class Timeline(logging.Handler):
    """Times node 0's phases from the launch's log; kills node 1's worker at `kill_at`."""

    def __init__(self, kill_at: int | None):
        super().__init__(logging.INFO)
        self.started, self.marks, self.kill_at = time.monotonic(), {}, kill_at

    def emit(self, record: logging.LogRecord) -> None:
        line, now = record.getMessage(), time.monotonic()
        for name, pattern in PHASES.items():
            if not line.startswith("[node ") and pattern.search(line):
                self.marks.setdefault(name, now)
        if self.kill_at and line.endswith(f"Saved checkpoint of step {self.kill_at}"):
            os.kill(node1_worker(), signal.SIGKILL)
            self.marks["killed"], self.kill_at = now, None
        if "killed" in self.marks and "Resuming training" in line:
            self.marks.setdefault("resumed", now)

    def phases(self) -> str:
        spans, start = [], self.started
        for name in (n for n in PHASES if n in self.marks):
            spans.append(f"{name} {self.marks[name] - start:.1f} s")
            start = self.marks[name]
        if "resumed" in self.marks:
            spans.append(
                f"restart (kill to resumed) {self.marks['resumed'] - self.marks['killed']:.1f} s"
            )
        return ", ".join(spans)


def node1_worker() -> int:
    """Local node 1's training worker under this process (not its torchrun agent)."""
    marks = {f"{SUPERVISOR_ENV}={os.getpid()}".encode(), f"{NODE_ENV}=1".encode()}
    for entry in Path("/proc").iterdir():
        try:
            environ = set((entry / "environ").read_bytes().split(b"\0"))
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if marks <= environ and b"torch.distributed.run" not in cmdline and b"-m" in cmdline:
            return int(entry.name)
    raise RuntimeError("node 1's worker is not running")


def timed_run(root: Path, components: dict, overrides: list[str], kill: bool):
    """(wall s, loop s, node 0's phases, final weights) of one `run_training` in a fresh workdir."""
    upstream = {"latents": make_latents(root, components), "autoencoder": None, "caption": None}
    every = KILL_AT if kill else STEPS
    steps = [f"train.max_steps={STEPS}", f"train.checkpoint_every={every}", "train.log_every=10"]
    config = scratch_config(components, *steps, *overrides)
    timeline, train_log = Timeline(KILL_AT if kill else None), logging.getLogger("sdflow.train")
    train_log.addHandler(timeline)
    try:
        summary = run_training(config, upstream, str(root), root / "out")
    finally:
        train_log.removeHandler(timeline)
    wall = time.monotonic() - timeline.started
    weights = load_checkpoint(root / "out" / "checkpoints" / f"step-{STEPS:06d}")[1]["model"]
    return wall, summary.samples_seen / summary.samples_per_second, timeline.phases(), weights


def main(root: Path, four: bool) -> None:
    torch.set_num_threads(1)
    os.environ["LOGLEVEL"] = "INFO"  # torchrun's agents log their rendezvous
    logging.getLogger("sdflow.train").setLevel(logging.INFO)
    components = build_tiny_sd(root / "components")
    weights = {}
    for i, (name, overrides) in enumerate((FOUR if four else RUNS).items()):
        kill = "killed" in name
        wall, loop, phases, weights[name] = timed_run(root / f"run{i}", components, overrides, kill)
        print(
            f"{name}: wall {wall:.1f} s, training {loop:.2f} s ({loop / STEPS * 1e3:.0f} ms/step)"
        )
        print(f"    node 0: {phases}" if phases else "", flush=True)
    if four:
        one, two = weights.values()
        print(f"2 nodes x 2 == 1 node x 4 bitwise: {all(torch.equal(one[k], two[k]) for k in one)}")
        return
    ddp, fsdp = weights["torchrun 1 node x 2 (DDP)"], weights["torchrun 1 node x 2 (FSDP)"]
    diff = max((ddp[k] - fsdp[k]).abs().max().item() for k in ddp)
    largest = max(v.abs().max().item() for v in ddp.values())
    print(f"FSDP vs DDP after {STEPS} steps: max abs diff {diff:.3g}, max |w| {largest:.3g}")
    for other in ("torchrun 2 nodes x 1 (DDP)", "torchrun 2 nodes x 1, worker killed, restarted"):
        same = all(torch.equal(ddp[k], weights[other][k]) for k in ddp)
        print(f"{other} == 1 node x 2 bitwise: {same}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path, help="a scratch directory for the runs")
    parser.add_argument("--four-processes", action="store_true", help="1 x 4 against 2 x 2")
    args = parser.parse_args()
    main(args.workdir, args.four_processes)
