"""A real Prefect server with sdflow deployed and a process worker, for the server and UI tests.

`sdflow server` (that is, `prefect server start`) on a free loopback port with its own PREFECT_HOME
and SQLite database in a temp dir, `sdflow deploy`, and `prefect worker start` on the process pool.
The tests talk to the server through its REST API with httpx, as the UI does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from sdflow.config import STAGES

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class ServedPrefect:
    url: str  # the UI; the API is url + "/api"
    env: dict[str, str]  # for `prefect` / `sdflow` commands against this server
    workdir: Path  # the deployments' workdir (stage outputs)
    logs: Path
    csrf_client: str = field(default_factory=lambda: str(uuid.uuid4()))

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """One REST call; a 503 (SQLite busy, say) is retried as Prefect's own client does.

        Changes carry a CSRF token, as Prefect's client and UI send them (`sdflow server` turns
        CSRF protection on)."""
        if method != "GET":
            kwargs["headers"] = {**kwargs.get("headers", {}), **self.csrf_headers()}
        for attempt in range(6):
            response = httpx.request(method, f"{self.url}/api{path}", timeout=30, **kwargs)
            if response.status_code not in (429, 503):
                break
            time.sleep(0.5 * 2**attempt)
        response.raise_for_status()
        return response.json() if response.content else None

    def csrf_headers(self) -> dict[str, str]:
        params = {"client": self.csrf_client}
        response = httpx.get(f"{self.url}/api/csrf-token", params=params, timeout=30)
        response.raise_for_status()
        return {
            "Prefect-Csrf-Token": response.json()["token"],
            "Prefect-Csrf-Client": self.csrf_client,
        }

    def run_deployment(self, name: str, parameters: dict[str, Any]) -> str:
        deployment = self.api("GET", f"/deployments/name/{name}")
        run = self.api(
            "POST",
            f"/deployments/{deployment['id']}/create_flow_run",
            json={"parameters": parameters},
        )
        return run["id"]

    def wait(self, flow_run_id: str, timeout: float = 480) -> dict[str, Any]:
        """The flow run once it is final (the worker may take a moment to pick it up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.api("GET", f"/flow_runs/{flow_run_id}")
            if run["state_type"] in FINAL:
                return run
            time.sleep(1)
        raise AssertionError(f"flow run {flow_run_id} not final after {timeout}s:\n{self.tail()}")

    def task_runs(self, flow_run_id: str) -> list[dict[str, Any]]:
        body = {
            "task_runs": {"flow_run_id": {"any_": [flow_run_id]}},
            "sort": "EXPECTED_START_TIME_ASC",
        }
        return self.api("POST", "/task_runs/filter", json=body)

    def artifacts(self, flow_run_id: str) -> list[dict[str, Any]]:
        body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
        return self.api("POST", "/artifacts/filter", json=body)

    def run_logs(self, flow_run_id: str, newest_first: bool = False) -> list[dict[str, Any]]:
        """200 of the run's log records (the API's page), oldest or newest first."""
        body = {
            "logs": {"flow_run_id": {"any_": [flow_run_id]}},
            "sort": "TIMESTAMP_DESC" if newest_first else "TIMESTAMP_ASC",
            "limit": 200,
        }
        return self.api("POST", "/logs/filter", json=body)

    def messages_starting(self, flow_run_id: str, prefix: str, timeout: float = 30) -> list[str]:
        """Log messages of a run that start with `prefix`, waiting for them to arrive: a worker ships
        its logs in batches, so they may land after the run's final state."""
        deadline = time.monotonic() + timeout
        while True:
            found = [
                log["message"]
                for log in self.run_logs(flow_run_id, newest_first=True)
                if log["message"].startswith(prefix)
            ]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.5)

    def stage_states(self, flow_run_id: str, attempt: int | None = None) -> dict[str, str]:
        """{stage: state name} of a flow run's stage task runs (named `<stage>-<suffix>`; per-shard
        tasks are left out), or of one attempt of it (a retried flow run keeps every attempt's)."""
        runs = [
            r for r in self.task_runs(flow_run_id) if attempt in (None, r["flow_run_run_count"])
        ]
        named = {run["name"].rsplit("-", 1)[0]: run["state_name"] for run in runs}
        return {stage: state for stage, state in named.items() if stage in STAGES}

    def tiny_test(self, source: Path, *overrides: str) -> dict[str, Any]:
        """Deployment parameters: tiny-test on `source`, in this server's workdir."""
        return {
            "profile": "tiny-test",
            "overrides": [f"source.path={source}", *overrides],
            "workdir": str(self.workdir),
        }

    def tail(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-40:])
            for p in sorted(self.logs.glob("*.log"))
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A background process in its own session, so teardown stops it and all its children."""
    with open(log, "w") as out:
        return subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_healthy(served: ServedPrefect, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(
                f"prefect server exited with {server.returncode}:\n{served.tail()}"
            )
        try:
            if httpx.get(f"{served.url}/api/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"prefect server not healthy after {timeout}s:\n{served.tail()}")


def serve(root: Path) -> tuple[ServedPrefect, subprocess.Popen]:
    """`sdflow server` on a free loopback port, state under `root`; returns once it is healthy."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # pick runs up at once
        "OMP_NUM_THREADS": "1",  # tiny models: one thread is as fast, and shares 2 busy cores well
        "DO_NOT_TRACK": "1",
    }
    logs = root / "logs"
    logs.mkdir()
    served = ServedPrefect(f"http://127.0.0.1:{port}", env, root / "work", logs)
    sdflow = [sys.executable, "-m", "sdflow.cli"]
    server = start(
        [*sdflow, "server", "--workdir", str(root / "server"), "--port", str(port)],
        env,
        logs / "server.log",
    )
    try:
        wait_healthy(served, server)
    except BaseException:
        stop(server)
        raise
    return served, server


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory) -> ServedPrefect:
    """A server of its own, with nothing deployed and no worker (the GPU-slot tests)."""
    served, server = serve(tmp_path_factory.mktemp("bare"))
    try:
        yield served
    finally:
        stop(server)


@pytest.fixture(scope="session")
def served_prefect(tmp_path_factory) -> ServedPrefect:
    served, server = serve(tmp_path_factory.mktemp("served"))
    env, logs = served.env, served.logs
    sdflow = [sys.executable, "-m", "sdflow.cli"]
    worker = None
    try:
        deploy = [*sdflow, "deploy", "--workdir", str(served.workdir), "--gpus", "1"]
        done = subprocess.run(
            [*deploy, "--pause-schedules"], env=env, capture_output=True, text=True, timeout=300
        )
        (logs / "deploy.log").write_text(done.stdout + done.stderr)
        assert done.returncode == 0, done.stdout + done.stderr
        prefect = [sys.executable, "-m", "prefect"]
        worker_command = [*prefect, "worker", "start", "--pool", "sdflow", "--limit", "1"]
        worker = start(worker_command, env, logs / "worker.log")
        yield served
    finally:
        for process in (worker, server):
            if process is not None:
                stop(process)


@pytest.fixture(scope="session")
def completed_run(served_prefect, demo_folder) -> str:
    """A deployment run of tiny-test on the demo folder, Completed; returns its flow-run id."""
    flow_run_id = served_prefect.run_deployment(
        "sdflow-pipeline/manual", served_prefect.tiny_test(demo_folder)
    )
    run = served_prefect.wait(flow_run_id)
    assert run["state_type"] == "COMPLETED", served_prefect.tail()
    return flow_run_id
