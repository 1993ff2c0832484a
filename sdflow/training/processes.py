"""The training loop in this process or in several: `run_training` runs `train_unet` in-process for
`train.processes: 1`, and otherwise under `accelerate launch -m sdflow.training.processes spec.json`
(one process per GPU, or gloo processes on a CPU), supervised by `sdflow.ops.launch`: the workers'
output streams into the `sdflow.train` log, their `step N/M` lines become the stage's progress in the
UI, and a failure or cancellation ends them all. A worker that meets a user mistake writes it to the
spec's error file, so the stage fails without retries.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from sdflow.config import RunConfig, TrainConfig
from sdflow.errors import UserError, as_user_error
from sdflow.ops.artifacts import report_progress
from sdflow.ops.gpuslots import gpu_count, held_device
from sdflow.ops.launch import LaunchFailed, accelerate_command, exit_with_supervisor, supervise
from sdflow.store.stageio import Manifest, write_json
from sdflow.training.loop import TrainSummary, train_unet

STEP_LINE = re.compile(r"step (\d+)/(\d+) loss")

log = logging.getLogger("sdflow.train")


def resolve_processes(train: TrainConfig) -> int:
    """`train.processes` as a number: "auto" is one process per visible GPU (one without a GPU)."""
    if train.processes == "auto":
        return max(1, torch.cuda.device_count())
    return train.processes


def run_training(
    config: RunConfig, upstream: dict[str, Manifest | None], workdir: str, out_dir: str | Path
) -> TrainSummary:
    """`train_unet` in this process, or in `train.processes` processes under `accelerate launch`."""
    processes = resolve_processes(config.train)
    if processes == 1:
        return train_unet(config, upstream, workdir, out_dir)
    with tempfile.TemporaryDirectory(prefix="sdflow-train-") as tmp:
        spec = {
            "config": config.model_dump(mode="json"),
            "upstream": upstream,
            "workdir": str(workdir),
            "out_dir": str(out_dir),
            "summary": str(Path(tmp) / "summary.json"),
            "error": str(Path(tmp) / "error.json"),
        }
        write_json(Path(tmp) / "spec.json", spec)
        cmd, env = launch_command(config.train, processes, Path(tmp) / "spec.json")
        try:
            supervise(cmd, log, env={**os.environ, **env}, on_line=report_steps)
        except LaunchFailed:
            error = Path(spec["error"])
            if error.is_file():  # a worker met a user mistake: say so, and do not retry
                raise UserError(json.loads(error.read_text())["user_error"]) from None
            raise
        return TrainSummary(**json.loads(Path(spec["summary"]).read_text()))


def report_steps(line: str) -> None:
    """Progress in the UI from the workers' `step N/M` log lines (they cannot reach the API)."""
    if match := STEP_LINE.match(line):
        report_progress("train", int(match[1]), int(match[2]), "steps")


def launch_command(train: TrainConfig, processes: int, spec: Path) -> tuple[list[str], dict]:
    """`accelerate launch` of this module: one process per GPU, or gloo processes on a CPU host."""
    gpus = gpu_count()  # 1 while the stage holds a GPU slot (a deployment's gpu-<i> limit)
    if gpus and processes > gpus:
        have = "its GPU slot gives the stage" if held_device() is not None else "this host has"
        raise UserError(
            f"train.processes is {processes} ({train.processes!r}) but {have} {gpus} GPU(s): "
            f"use at most {gpus}. A deployment with GPU slots trains on one GPU per stage; "
            "`sdflow run` without slots may use every GPU of the host."
        )
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return accelerate_command(
        processes,
        "sdflow.training.processes",  # this module, also when it runs as __main__
        [str(spec)],
        gpu=gpus > 0,
        mixed_precision=train.mixed_precision,
        cpu_threads=max(1, (cpus or 1) // processes),
    )


def main(argv: list[str] | None = None) -> None:
    """A worker of `accelerate launch -m sdflow.training.processes spec.json` (see `run_training`)."""
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text())
    exit_with_supervisor()
    rank = int(os.environ.get("RANK", "0"))
    # The supervisor logs what rank 0 says; other ranks only speak up about problems.
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s %(message)s",
    )
    config = RunConfig.model_validate(spec["config"])
    try:
        summary = train_unet(config, spec["upstream"], spec["workdir"], spec["out_dir"])
    except Exception as exc:  # a user mistake, or out of memory / disk full: no retry will help
        deterministic = as_user_error(exc, "train")
        if deterministic is not None and spec.get("error"):
            write_json(spec["error"], {"user_error": str(deterministic)})
        raise
    if rank == 0 and spec.get("summary"):
        write_json(spec["summary"], asdict(summary))


if __name__ == "__main__":
    main()
