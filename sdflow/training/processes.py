"""The training loop in this process or in several: `run_training` runs `train_unet` in-process for
`train.processes: 1` on one node, and otherwise as `torchrun ... -m sdflow.training.processes
spec.json` on `train.nodes` nodes (one process per GPU, or gloo processes on a CPU) started by
`runner.train_launcher` (sdflow.ops.torchrun, .kubernetes, .slurm). Locally the nodes are process
groups supervised by `sdflow.ops.launch`: the workers' output streams into the `sdflow.train` log, their `step N/M` lines become the stage's progress in the
UI, and a failure or cancellation ends them all. A worker that meets a user mistake writes it to the
spec's error file, so the stage fails without retries.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import uuid
from dataclasses import asdict
from pathlib import Path

import torch

from sdflow.config import RunConfig, TrainConfig
from sdflow.errors import UserError, as_user_error
from sdflow.ops.artifacts import report_progress
from sdflow.ops.gpuslots import gpu_count, held_device
from sdflow.ops.launch import LaunchFailed, exit_with_supervisor, supervise_groups
from sdflow.ops.torchrun import (
    USER_ERROR_PREFIX,
    check_shared_workdir,
    local_node_envs,
    loopback_port,
    torchrun_command,
)
from sdflow.store.stageio import Manifest, write_json
from sdflow.training.loop import train_unet
from sdflow.training.trainer import TrainSummary

MODULE = "sdflow.training.processes"  # the workers' entry: this module, also as __main__
LAUNCHES = ".sdflow-launch"  # in the workdir: each launch's spec, node markers, summary
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
    """`train_unet` in this process, or on `train.nodes` x `train.processes` torchrun workers."""
    processes = resolve_processes(config.train)
    if processes == 1 and config.train.nodes == 1 and config.runner.train_launcher == "local":
        return train_unet(config, upstream, workdir, out_dir)
    run_id = f"sdflow-{uuid.uuid4().hex[:12]}"
    launch_dir = Path(workdir) / LAUNCHES / run_id  # on the shared workdir: every node reads it
    spec = {
        "config": config.model_dump(mode="json"),
        "upstream": upstream,
        "workdir": ".",  # every node runs in its own mount of the workdir
        "out_dir": os.path.relpath(out_dir, workdir),
        "summary": f"{LAUNCHES}/{run_id}/summary.json",
        "error": f"{LAUNCHES}/{run_id}/error.json",
    }
    launch_dir.mkdir(parents=True)
    write_json(launch_dir / "spec.json", spec)
    cmd_args = [f"{LAUNCHES}/{run_id}/spec.json"]
    try:
        launch(config, processes, run_id, cmd_args, Path(workdir))
    except LaunchFailed as failed:
        error = Path(workdir) / spec["error"]
        if error.is_file():  # a worker met a user mistake: say so, and do not retry
            raise UserError(json.loads(error.read_text())["user_error"]) from None
        if said := [line for line in failed.tail if USER_ERROR_PREFIX in line]:
            raise UserError(said[-1].split(USER_ERROR_PREFIX, 1)[1]) from None
        raise
    else:
        summary = json.loads((Path(workdir) / spec["summary"]).read_text())
    finally:
        shutil.rmtree(launch_dir, ignore_errors=True)
    return TrainSummary(**summary)


def launch(config: RunConfig, processes: int, run_id: str, args: list[str], workdir: Path) -> None:
    """Start the nodes with `runner.train_launcher` and wait for them; the same torchrun line."""
    train, runner = config.train, config.runner
    python = sys.executable if runner.train_launcher == "local" else "python"  # the image's
    cmd = torchrun_command(train.nodes, processes, run_id, train.max_restarts, MODULE, args, python)
    if runner.train_launcher == "kubernetes":
        from sdflow.ops.kubernetes import run_jobset

        run_jobset(
            runner.kubernetes, run_id, train.nodes, cmd, log, train.max_restarts, report_steps
        )
    elif runner.train_launcher == "slurm":
        from sdflow.ops.slurm import run_sbatch

        launch_dir = workdir / LAUNCHES / run_id
        run_sbatch(runner.slurm, run_id, train.nodes, cmd, workdir, launch_dir, log, report_steps)
    else:
        port = loopback_port(runner.rendezvous_port)
        envs = local_node_envs(train.nodes, port, {**os.environ, **worker_env(train, processes)})
        supervise_groups([cmd] * train.nodes, log, envs, on_line=report_steps, cwd=str(workdir))


def report_steps(line: str) -> None:
    """Progress in the UI from the workers' `step N/M` log lines (they cannot reach the API)."""
    if match := STEP_LINE.match(line):
        report_progress("train", int(match[1]), int(match[2]), "steps")


def worker_env(train: TrainConfig, processes: int) -> dict[str, str]:
    """The local workers' environment: gloo processes on a CPU host, one thread each."""
    gpus = gpu_count()  # 1 while the stage holds a GPU slot (a deployment's gpu-<i> limit)
    workers = processes * train.nodes
    if gpus and workers > gpus:
        have = "its GPU slot gives the stage" if held_device() is not None else "this host has"
        raise UserError(
            f"train.processes is {processes} ({train.processes!r}) on {train.nodes} local node(s), "
            f"{workers} workers, but {have} {gpus} GPU(s): use at most {gpus} in all. A "
            "deployment with GPU slots trains on one GPU per stage; `sdflow run` without slots "
            "may use every GPU of the host, and a cluster launcher (runner.train_launcher) more."
        )
    if gpus:
        return {}
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": str(max(1, (cpus or 1) // workers))}


def main(argv: list[str] | None = None) -> None:
    """A worker of `torchrun ... -m sdflow.training.processes spec.json` (see `run_training`)."""
    args = sys.argv[1:] if argv is None else argv
    exit_with_supervisor()
    rank = int(os.environ.get("RANK", "0"))
    spec_path = Path(args[0])
    try:  # before any training: every node must see the stage's workdir
        check_shared_workdir(spec_path.parent, spec_path, int(os.environ.get("GROUP_RANK", "0")))
    except UserError as exc:
        print(f"{USER_ERROR_PREFIX}{exc}", flush=True)
        raise SystemExit(2) from None
    spec = json.loads(spec_path.read_text())
    # The supervisor logs what rank 0 says; other ranks only speak up about problems.
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s %(message)s",
    )
    config = RunConfig.model_validate(spec["config"])
    if restarts := int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")):
        log.warning(
            "elastic restart %d of this node: resuming from the newest checkpoint", restarts
        )
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
