"""The runs' own Prefect server: one per PREFECT_HOME, started in the background, reused, checked.

    sdflow server --background   # start it (or say where the running one is)
    sdflow server --status       # where it is, or that none runs
    sdflow server --stop         # stop it

A plain `sdflow run` (no PREFECT_API_URL) uses it: `ensure_server` returns the URL of the healthy
server of this PREFECT_HOME, starting one when there is none. Prefect's own alternative, a temporary
server per command, costs every command a server start (~10 s on a quiet 2-core box, the same again
for each run) and gives up after 20 s, so a busy host fails the run. The background server starts
once, is waited for as long as its process lives (up to START_WAIT_S), and then answers each run at
once. It is the hardened server of `sdflow.ops.server` on a port the kernel picks, its database
Prefect's default (`$PREFECT_HOME/prefect.db`, the temporary server's too), its log
`$PREFECT_HOME/sdflow-server.log`.

Its state is `$PREFECT_HOME/sdflow-server.json` (pid, port, url), written under a file lock so
that runs starting together start one server. A state whose process is gone, or is not an sdflow
server, or does not answer /api/health within HEALTH_GRACE_S, is replaced by a fresh server.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from sdflow.errors import UserError
from sdflow.ops.server import hardened_env, listening_socket, server_command, ui_url

STATE, LOCK, LOG = "sdflow-server.json", "sdflow-server.lock", "sdflow-server.log"
START_WAIT_S = 600.0  # a server that is still starting after 10 minutes is stuck, not slow
HEALTH_GRACE_S = 30.0  # a live server that does not answer for this long is replaced
STOP_WAIT_S = 15.0


def prefect_home(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get("PREFECT_HOME") or "~/.prefect").expanduser().resolve()


def ensure_server(home: Path | None = None, start_wait_s: float = START_WAIT_S) -> str:
    """The API URL of this PREFECT_HOME's background server, started if none is healthy."""
    home = home or prefect_home()
    with _locked(home):
        state = read_state(home)
        if state and _is_ours(state["pid"]):
            if _wait_healthy(state["url"], state["pid"], HEALTH_GRACE_S):
                return state["url"]
            _terminate(state["pid"])
        return _start(home, start_wait_s)


def stop_server(home: Path | None = None) -> dict | None:
    """Stop this PREFECT_HOME's background server; returns its state, or None when none ran."""
    home = home or prefect_home()
    with _locked(home):
        state = read_state(home)
        (home / STATE).unlink(missing_ok=True)
        if state and _is_ours(state["pid"]):
            _terminate(state["pid"])
            return state
    return None


def read_state(home: Path) -> dict | None:
    try:
        state = json.loads((home / STATE).read_text())
        return state if {"pid", "port", "url"} <= state.keys() else None
    except (OSError, ValueError):
        return None


def healthy(url: str, timeout: float = 2.0) -> bool:
    """Whether the API at `url` answers its health check (an sdflow server checks the Host)."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def _start(home: Path, wait_s: float) -> str:
    sock = listening_socket(0)  # bound here: the port is known and nobody else can take it
    port = sock.getsockname()[1]
    env = hardened_env(port)
    env.pop("PREFECT_API_URL", None)
    env["SDFLOW_SERVER_LOG_LEVEL"] = "warning"
    with open(home / LOG, "ab") as log:
        process = subprocess.Popen(
            server_command(fd=sock.fileno()),
            env=env,
            pass_fds=[sock.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command; Ctrl-C of a run does not reach it
        )
    sock.close()
    url = f"{ui_url(port)}/api"
    state = {"pid": process.pid, "port": port, "url": url, "started_at": time.time()}
    _write_state(home, state)
    if not _wait_healthy(url, process.pid, wait_s):
        _terminate(process.pid)
        (home / STATE).unlink(missing_ok=True)
        raise UserError(
            f"The background Prefect server did not become healthy within {wait_s:.0f} s "
            f"(exit code {process.poll()}); its log is {home / LOG}. Set PREFECT_API_URL to "
            "use another server."
        )
    process.returncode = 0  # it is meant to outlive this object: no "still running" warning
    return url


def _wait_healthy(url: str, pid: int, wait_s: float) -> bool:
    """Poll the health check while the process lives, up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while _alive(pid):
        if healthy(url):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return False


def _write_state(home: Path, state: dict) -> None:
    partial = home / f".{STATE}.{os.getpid()}"
    partial.write_text(json.dumps(state))
    partial.replace(home / STATE)


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True)
    with open(home / LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a stopped server not yet reaped by its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _is_ours(pid: int) -> bool:
    """Alive, and an sdflow server process (a recycled pid is someone else's)."""
    if not _alive(pid):
        return False
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: trust the state file
    return b"sdflow.ops.server" in command


def _terminate(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGTERM)  # its own session: uvicorn and anything it started
    deadline = time.monotonic() + STOP_WAIT_S
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # started by this process: reap it


@contextlib.contextmanager
def flow_api() -> Iterator[None]:
    """The Prefect API of a flow run started here: the configured one (PREFECT_API_URL, a Prefect
    profile, a test harness), else this PREFECT_HOME's background server, started if needed
    (`sdflow.ops.background`). With SDFLOW_SERVER=temporary, Prefect's temporary server instead,
    hardened like ours and given START_WAIT_S to start rather than Prefect's 20 s."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
        temporary_settings,
    )

    if get_current_settings().api.url:
        yield
        return
    if os.environ.get("SDFLOW_SERVER", "background") == "temporary":
        # Prefect passes this environment on to the server process it starts. It has no UI, so
        # the CORS origins of port 0 match no page; CSRF is on.
        hardened = hardened_env(0)
        os.environ.update({k: v for k, v in hardened.items() if k.startswith("PREFECT_SERVER_")})
        wait = {PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: int(START_WAIT_S)}
        with temporary_settings(updates=wait):
            yield
        return
    with temporary_settings(updates={PREFECT_API_URL: ensure_server()}):
        yield
