"""Run a command as a supervised process group: its output streams into a logger, it dies with us.

`supervise(cmd, log)` starts `cmd` in a new session (a process group of its own), logs every output
line at INFO (stdout and stderr together, in order; carriage-return progress lines as tqdm writes
them at most once per `progress_every` seconds), and on every way out (success, failure, an
exception or cancellation in the caller) ends the whole group: SIGTERM, then SIGKILL after
`grace_s`. A non-zero exit raises `LaunchFailed` with the last lines of output.

`supervise_groups` runs several such groups side by side (the nodes of the local launcher, see
`sdflow.ops.torchrun`). torchrun starts each worker in a session of its own, out of reach
of our group signal, so workers call `exit_with_supervisor()`: a watchdog thread that ends the worker
when its launcher or the supervising process is gone (killed with SIGKILL, say), instead of training
on as an orphan that writes into a directory a retry is using.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import os
import re
import selectors
import shlex
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from sdflow.ops.gpuslots import child_visible_devices

SUPERVISOR_ENV = "SDFLOW_SUPERVISOR_PID"
ORPHANED_EXIT = 75  # exit status of a worker whose supervisor went away
_LINE_END = re.compile(r"\r\n|\n|\r")


class LaunchFailed(RuntimeError):
    """A supervised command exited with a non-zero status; the message ends with its output tail."""

    def __init__(self, cmd: Sequence[str], returncode: int, tail: Sequence[str]):
        self.returncode = returncode
        self.tail = list(tail)
        last = "\n".join(self.tail) or "(no output)"
        super().__init__(f"{shlex.join(cmd)} exited with status {returncode}; last output:\n{last}")


class OutputLog:
    """Cuts a byte stream into lines and logs them; tqdm's `\\r` redraws at most every few seconds.

    A segment ended by `\\r` is a progress redraw (tqdm writes `\\r<bar>` per update and `\\n` when
    done), so the final state of a bar, ended by `\\n`, is always logged.
    """

    def __init__(
        self,
        log: logging.Logger,
        progress_every: float = 10.0,
        tail: int = 40,
        on_line: Callable[[str], None] | None = None,
        prefix: str = "",
    ):
        self.log, self.progress_every, self.on_line = log, progress_every, on_line
        self.prefix = prefix
        self.tail: deque[str] = deque(maxlen=tail)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._progress_at = float("-inf")

    def feed(self, data: bytes) -> None:
        text = self._pending + self._decoder.decode(data)
        start = 0
        for match in _LINE_END.finditer(text):
            if match.group() == "\r" and match.end() == len(text):
                break  # maybe the first half of a \r\n split across reads
            self._emit(text[start : match.start()], redraw=match.group() == "\r")
            start = match.end()
        self._pending = text[start:]

    def close(self) -> None:
        self._emit(self._pending + self._decoder.decode(b"", final=True), redraw=False)
        self._pending = ""

    def _emit(self, line: str, redraw: bool) -> None:
        line = line.rstrip()
        if not line:
            return
        self.tail.append(line)
        if self.on_line is not None:
            self.on_line(line)
        if redraw:
            now = time.monotonic()
            if now - self._progress_at < self.progress_every:
                return
            self._progress_at = now
        self.log.info("%s%s", self.prefix, line)


def supervise(
    cmd: Sequence[str],
    log: logging.Logger,
    env: dict[str, str] | None = None,
    progress_every: float = 10.0,
    grace_s: float = 10.0,
    on_line: Callable[[str], None] | None = None,
    cwd: str | None = None,
) -> None:
    """Run `cmd` to completion in its own process group, logging its output; see the module doc."""
    supervise_groups([cmd], log, [env], progress_every, grace_s, on_line, cwd)


def supervise_groups(
    cmds: Sequence[Sequence[str]],
    log: logging.Logger,
    envs: Sequence[dict[str, str] | None],
    progress_every: float = 10.0,
    grace_s: float = 10.0,
    on_line: Callable[[str], None] | None = None,
    cwd: str | None = None,
) -> None:
    """Several commands side by side (the nodes of the local launcher), each its own process group.

    Group 0's lines are logged as they are (and go to `on_line`); group i's with `[node i]` before
    them. All groups end together on every way out; the first non-zero exit raises `LaunchFailed`.
    """
    procs, outputs = [], []
    try:
        for i, (cmd, env) in enumerate(zip(cmds, envs, strict=True)):
            procs.append(_start(cmd, env, cwd))
            log.info("Started (pid %d): %s", procs[-1].pid, shlex.join(cmd))
            prefix = f"[node {i}] " if i else ""
            outputs.append(
                OutputLog(log, progress_every, on_line=None if i else on_line, prefix=prefix)
            )
        _pump(procs, outputs)
    finally:
        for proc in procs:
            stop_group(proc, grace_s)
            proc.stdout.close()
    failed = [
        (cmd, proc.returncode, out)
        for cmd, proc, out in zip(cmds, procs, outputs, strict=False)
        if proc.returncode
    ]
    if failed:  # the first to fail: the others were ended because of it
        cmd, code, output = min(failed, key=lambda f: f[1] < 0)
        raise LaunchFailed(cmd, code, output.tail)


def _start(cmd: Sequence[str], env: dict[str, str] | None, cwd: str | None) -> subprocess.Popen:
    child_env = {**(os.environ if env is None else env)}
    child_env.update({SUPERVISOR_ENV: str(os.getpid()), "PYTHONUNBUFFERED": "1"})
    if (device := child_visible_devices(child_env)) is not None:  # the GPU slot's one device
        child_env["CUDA_VISIBLE_DEVICES"] = device
    return subprocess.Popen(
        list(cmd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=child_env,
        cwd=cwd,
        start_new_session=True,
    )


def _pump(procs: list[subprocess.Popen], outputs: list[OutputLog]) -> None:
    """Read every group's output until all have closed it, or one group fails (the caller ends the
    others: a node that died leaves the rest waiting for it). A blocking wait: a signal handler
    that raises (Prefect's cancellation, Ctrl-C) gets through, and the caller's finally ends them."""
    with selectors.DefaultSelector() as selector:
        for proc, output in zip(procs, outputs, strict=True):
            selector.register(proc.stdout, selectors.EVENT_READ, (proc, output))
        while selector.get_map():
            for key, _ in selector.select():
                proc, output = key.data
                if chunk := os.read(key.fileobj.fileno(), 65536):
                    output.feed(chunk)
                    continue
                selector.unregister(key.fileobj)
                output.close()
                if proc.wait() != 0:
                    return


def stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process group of `proc`, SIGKILL whatever is left after `grace_s`."""
    if not _signal_group(proc.pid, signal.SIGTERM):
        proc.wait()
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the group is empty: everything already exited
        return False
    return True


def exit_with_supervisor(poll_s: float = 1.0) -> None:
    """In a launched worker: exit when the launcher (our parent) or the supervisor is gone."""
    parent = os.getppid()
    supervisor = int(os.environ.get(SUPERVISOR_ENV) or 0)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent or (supervisor and not _alive(supervisor)):
                os._exit(ORPHANED_EXIT)  # no cleanup: the supervisor's retry owns the outputs now

    threading.Thread(target=watch, name="sdflow-supervisor-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
