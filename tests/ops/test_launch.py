"""Supervised subprocesses: output into the log, progress redraws throttled, the group ends with us."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdflow.errors import UserError
from sdflow.ops.launch import (
    ORPHANED_EXIT,
    SUPERVISOR_ENV,
    LaunchFailed,
    OutputLog,
    supervise,
    supervise_groups,
)
from sdflow.ops.torchrun import (
    check_shared_workdir,
    local_node_envs,
    loopback_port,
    torchrun_command,
)

ROOT = Path(__file__).resolve().parents[2]


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture()
def log():
    logger = logging.getLogger(f"sdflow.test-launch.{time.monotonic_ns()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(Lines())
    return logger


def logged(logger: logging.Logger) -> list[str]:
    return logger.handlers[0].lines


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def wait_gone(pids: list[int], timeout_s: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def test_lines_are_logged_and_progress_redraws_throttled(log):
    output = OutputLog(log, progress_every=3600)
    chunks = [b"hel", b"lo\n\r  0%|", b"\r 50%|", b"\r100%|\n", "caf\xe9".encode()[:4]]
    chunks += ["caf\xe9".encode()[4:] + b"\r", b"\nlast"]  # \r\n split across two reads
    for chunk in chunks:
        output.feed(chunk)
    output.close()
    # the first redraw is logged, the next within the interval is not, the final state (\n) is
    assert logged(log) == ["hello", "  0%|", "100%|", "caf\xe9", "last"]
    assert list(output.tail) == ["hello", "  0%|", " 50%|", "100%|", "caf\xe9", "last"]


def test_output_streams_in_order_and_a_failure_carries_the_tail(log):
    script = (
        "import sys; print('out 1'); print('err 2', file=sys.stderr); print('out 3'); sys.exit(3)"
    )
    with pytest.raises(LaunchFailed) as failed:
        supervise([sys.executable, "-c", script], log)
    assert failed.value.returncode == 3
    assert logged(log)[1:] == ["out 1", "err 2", "out 3"]  # after the "Started" line
    assert str(failed.value).endswith("out 1\nerr 2\nout 3")


class Cancelled(Exception):
    pass


GROUP_SCRIPT = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends this one
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("pids", child.pid, flush=True)
time.sleep(600)
"""


def test_cancellation_ends_the_whole_group_even_when_sigterm_is_ignored(log):
    pids: list[int] = []

    def cancel_when_started(line: str) -> None:
        if line.startswith("pids "):
            pids.append(int(line.split()[1]))
            raise Cancelled()

    with pytest.raises(Cancelled):
        supervise(
            [sys.executable, "-c", GROUP_SCRIPT], log, grace_s=0.5, on_line=cancel_when_started
        )
    assert pids and wait_gone(pids) == []  # the grandchild, in the same group, is gone too


WORKER_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from sdflow.ops.launch import exit_with_supervisor
exit_with_supervisor(poll_s=0.05)
print("ready", flush=True)
time.sleep(600)
"""


def test_a_worker_exits_when_its_supervisor_is_gone():
    supervisor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    env = {**os.environ, SUPERVISOR_ENV: str(supervisor.pid)}
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER_SCRIPT.format(root=str(ROOT))],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout.readline().strip() == "ready"
        assert worker.poll() is None
        supervisor.kill()
        supervisor.wait()  # reaped: its pid no longer exists
        assert worker.wait(timeout=60) == ORPHANED_EXIT
    finally:
        for proc in (supervisor, worker):
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        worker.stdout.close()


def test_the_torchrun_line_is_the_same_for_every_node_and_reads_its_endpoint_from_the_env():
    cmd = torchrun_command(2, 3, "sdflow-run", 1, "sdflow.training.processes", ["spec.json"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--nproc-per-node") + 1] == "3"
    assert cmd[cmd.index("--rdzv-backend") + 1] == "c10d" and "--rdzv-endpoint" not in cmd
    assert cmd[-3:] == ["-m", "sdflow.training.processes", "spec.json"]
    envs = local_node_envs(2, 29511, {"A": "1"})
    fresh_store = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # see sdflow.ops.torchrun
    assert envs == [
        {"A": "1", **fresh_store, "PET_RDZV_ENDPOINT": "127.0.0.1:29511", "SDFLOW_NODE": str(i)}
        for i in (0, 1)
    ]


def test_a_taken_rendezvous_port_is_a_user_error_before_any_start():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"runner.rendezvous_port {port} is in use"):
            loopback_port(port)
    assert loopback_port(None) > 0


def test_a_node_that_cannot_see_the_workdir_of_node_0_stops_with_the_reason(tmp_path):
    shared, other = tmp_path / "shared", tmp_path / "elsewhere"
    (shared / "launch").mkdir(parents=True)
    (shared / "launch" / "spec.json").write_text("{}")
    check_shared_workdir(shared / "launch", shared / "launch" / "spec.json", 0)  # node 0 marks
    check_shared_workdir(shared / "launch", shared / "launch" / "spec.json", 1, timeout_s=0.1)
    assert sorted(p.name for p in (shared / "launch" / "nodes").iterdir()) == ["node-0", "node-1"]
    with pytest.raises(UserError, match="node 1 .* cannot see the spec .* not shared"):
        check_shared_workdir(other / "launch", other / "launch" / "spec.json", 1, timeout_s=0.1)
    (other / "launch").mkdir(parents=True)  # a copy of the spec, but node 0 writes elsewhere
    (other / "launch" / "spec.json").write_text("{}")
    with pytest.raises(UserError, match="cannot see node 0's marker .* not shared"):
        check_shared_workdir(other / "launch", other / "launch" / "spec.json", 1, timeout_s=0.1)


def test_several_groups_log_side_by_side_and_one_failure_ends_them_all(log):
    slow = [sys.executable, "-c", "import time; print('node 0 up', flush=True); time.sleep(60)"]
    fail = [sys.executable, "-c", "import sys; print('node 1 fails'); sys.exit(4)"]
    started = time.monotonic()
    with pytest.raises(LaunchFailed, match="exited with status 4"):
        supervise_groups([slow, fail], log, [None, None], grace_s=1)
    assert time.monotonic() - started < 30  # node 0 did not sleep its 60 s
    assert "[node 1] node 1 fails" in logged(log)
