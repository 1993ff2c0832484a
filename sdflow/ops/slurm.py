"""`runner.train_launcher: slurm`: the train stage's nodes as one sbatch job, watched through sacct.

`sbatch_script` writes a batch script of `train.nodes` nodes, one task each, that runs the shared
torchrun line (`sdflow.ops.torchrun.torchrun_command`) on every node with `srun`: the first host of
the allocation is the rendezvous endpoint, `SLURM_NODEID` the node's index. It runs in the workdir
(a shared filesystem, the same path on every node) and writes its output beside the launch's spec.

`run_sbatch` submits it (`sbatch --parsable`), polls `sacct` until the job ends, logs the output
file's new lines as they come, and `scancel`s the job on every way out but its own end (a cancelled
Prefect run, Ctrl-C). `watch_job` takes the command runner as an argument, so the tests replay
recorded sacct answers.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sdflow.config.distributed import SlurmLauncher
from sdflow.ops.launch import LaunchFailed, OutputLog
from sdflow.ops.torchrun import AGENT_ENV, ENDPOINT_ENV, NODE_ENV

DONE = {"COMPLETED"}
FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}
DEADLINE = "DEADLINE"


def sbatch_script(
    slurm: SlurmLauncher, name: str, nodes: int, cmd: Sequence[str], workdir: Path, output: Path
) -> str:
    """The batch script (see the module doc); its last line is the torchrun line, unchanged."""
    options = [
        f"--job-name={name}",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={slurm.cpus_per_task}",
        f"--time={slurm.time_limit}",
        f"--chdir={workdir}",
        f"--output={output}",
    ]
    options += [f"--gpus-per-node={slurm.gpus_per_node}"] if slurm.gpus_per_node else []
    options += [f"--partition={slurm.partition}"] if slurm.partition else []
    options += [f"--account={slurm.account}"] if slurm.account else []
    node = f'export {NODE_ENV}=$SLURM_NODEID PET_NODE_RANK=$SLURM_NODEID; exec "$@"'
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {shlex.quote(option)}" for option in options),
        "set -euo pipefail",
        *slurm.setup,
        'head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"',
        f'export {ENDPOINT_ENV}="$head_node:{slurm.rendezvous_port}" PYTHONUNBUFFERED=1',
        "export " + " ".join(f"{key}={shlex.quote(value)}" for key, value in AGENT_ENV.items()),
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(node)} sdflow-node \\",
        f"  {shlex.join(cmd)}",
    ]
    return "\n".join(lines) + "\n"


Runner = Callable[[list[str]], str]


def run_command(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def job_state(job: str, run: Runner) -> str | None:
    """The job's state from sacct (None before the accounting knows it)."""
    out = run(["sacct", "-j", job, "-X", "-n", "-P", "-o", "State"]).split()
    return out[0].split()[0].rstrip("+") if out else None  # "CANCELLED by 123" -> CANCELLED


def watch_job(
    job: str,
    output_file: Path,
    log: logging.Logger,
    poll_s: float,
    run: Runner = run_command,
    on_line: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Poll sacct until the job ends; its output file's new text goes into `log` meanwhile."""
    output, logged = OutputLog(log, on_line=on_line), 0
    while True:
        state = job_state(job, run)
        if output_file.is_file():
            data = output_file.read_bytes()
            output.feed(data[logged:])
            logged = len(data)
        if state in DONE | FAILED or state == DEADLINE:
            output.close()
            if state in DONE:
                return
            raise LaunchFailed([f"slurm job {job}"], 1, [*output.tail, f"job state {state}"])
        sleep(poll_s)


def run_sbatch(
    slurm: SlurmLauncher,
    name: str,
    nodes: int,
    cmd: Sequence[str],
    workdir: Path,
    launch_dir: Path,
    log: logging.Logger,
    on_line: Callable[[str], None] | None = None,
    run: Runner = run_command,
) -> None:
    """Submit, watch, and scancel on any way out but the job's own end."""
    output = launch_dir / "slurm.out"
    script = launch_dir / "train.sbatch"
    script.write_text(sbatch_script(slurm, name, nodes, cmd, workdir, output))
    job = run(["sbatch", "--parsable", str(script)]).strip().split(";")[0]
    log.info("Submitted Slurm job %s: %d nodes", job, nodes)
    ended = False
    try:
        watch_job(job, output, log, slurm.poll_s, run, on_line)
        ended = True
    except LaunchFailed:
        ended = True
        raise
    finally:
        if not ended:
            run(["scancel", job])
            log.info("Cancelled Slurm job %s", job)
