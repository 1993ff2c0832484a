"""The fixed cost of the `sdflow` command before any work: imports, profile load, server, flow set-up.

    .venv/bin/python bench/startup.py [--code DIR] [--repeat 3]

Each figure is the median of `--repeat` fresh processes on the checkout at `--code` (default: this
one; point it at an older checkout for a before/after):

- `sdflow profiles`, `sdflow check tiny-test` (on the demo data): whole command, wall seconds;
- `import flows.pipeline`: what `sdflow run` imports before the flow starts, and which heavy libraries
  that loads;
- `sdflow run tiny-test --only download` against an already running `sdflow server` (127.0.0.1, in a
  temp dir, PREFECT_API_URL set): seconds from launch until the flow body starts its first stage
  (summary.json's `started_at`, written as the download stage begins) and until the command ends;
- the same run without PREFECT_API_URL (Prefect starts an ephemeral server for the run).

The figures with a target in issue 13 (`check` and `profiles` under a second, the first stage within
5 s against a running server) go to `bench/summary.py` as comparisons against that target.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

from results import comparison, save  # bench/, beside this script

HERE = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers", "prefect")
TARGETS = {  # key: (what, target seconds)
    "profiles_s": ("`sdflow profiles`", 1.0),
    "check_s": ("`sdflow check tiny-test`", 1.0),
    "server_first_stage_s": ("`sdflow run` to its first stage, running server", 5.0),
}


def _env(code: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "PYTHONPATH": str(code), "DO_NOT_TRACK": "1", **extra}


def timed(command: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:])} failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - started


def sdflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "sdflow.cli", *args]


def import_cost(code: Path, cwd: Path) -> tuple[float, list[str]]:
    probe = (
        "import sys, time; t = time.perf_counter(); import flows.pipeline; "
        f"print(time.perf_counter() - t, [m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env=_env(code),
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,  # cwd: `-c` puts the working directory first on sys.path
    ).stdout.split(" ", 1)
    return float(out[0]), eval(out[1])  # noqa: S307 - our own probe's list literal


def run_to_first_stage(
    code: Path, tmp: Path, demo: str, api_url: str | None
) -> tuple[float, float]:
    """(seconds until the first stage starts, seconds until the command ends) for one run."""
    workdir = tmp / f"work-{time.monotonic_ns()}"
    extra = {"PREFECT_HOME": str(tmp / "home")}
    if api_url:
        extra["PREFECT_API_URL"] = api_url
    launched = time.time()
    total = timed(
        sdflow("run", "tiny-test", "--only", "download", "--workdir", str(workdir),
               "--set", f"source.path={demo}"),
        _env(code, **extra), tmp,
    )  # fmt: skip
    summary = json.loads(next((workdir / "runs").glob("*/summary.json")).read_text())
    started = datetime.fromisoformat(summary["started_at"]).timestamp()
    return started - launched, total


def start_server(code: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = _env(code, PREFECT_HOME=str(tmp / "server-home"))
    server = subprocess.Popen(
        sdflow("server", "--workdir", str(tmp / "server"), "--port", str(port)),
        env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return server, url
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise RuntimeError("sdflow server did not answer within 180 s")


def measure(code: Path, repeat: int, ephemeral: bool) -> dict:
    median = statistics.median
    with tempfile.TemporaryDirectory(prefix="sdflow-startup-") as name:
        tmp = Path(name)
        demo = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; from sdflow.data.sources.demo "
             f"import make_demo_dataset; print(make_demo_dataset(Path({str(tmp / 'demo')!r})))"],
            env=_env(code), capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()[-1]  # fmt: skip
        result = {
            "profiles_s": median(timed(sdflow("profiles"), _env(code), tmp) for _ in range(repeat)),
            "check_s": median(
                timed(sdflow("check", "tiny-test", "--set", f"source.path={demo}"), _env(code), tmp)
                for _ in range(repeat)
            ),
        }
        imports = [import_cost(code, tmp) for _ in range(repeat)]
        result["import_pipeline_s"] = median(seconds for seconds, _ in imports)
        result["import_pipeline_loads"] = imports[0][1]
        server, url = start_server(code, tmp)
        try:
            runs = [run_to_first_stage(code, tmp, demo, url) for _ in range(repeat)]
        finally:
            server.terminate()
            server.wait(30)
        result["server_first_stage_s"] = median(first for first, _ in runs)
        result["server_run_total_s"] = median(total for _, total in runs)
        if ephemeral:
            first, total = run_to_first_stage(code, tmp, demo, None)
            result["ephemeral_first_stage_s"], result["ephemeral_run_total_s"] = first, total
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, default=HERE, help="the sdflow checkout to measure")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-ephemeral", action="store_true", help="skip the ephemeral-server run")
    args = parser.parse_args()
    result = measure(args.code.resolve(), args.repeat, not args.no_ephemeral)
    for key, value in result.items():
        print(f"  {key:<26} {value}")
    rows = [
        comparison(f"{what}, median of {args.repeat}", "s", result[key], "target", target,
                   goal=1.0, higher_is_better=False)
        for key, (what, target) in TARGETS.items()
    ]  # fmt: skip
    save("startup", "startup", rows, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
