"""Where a run's wall time goes outside stage work: imports, the API, flow set-up, bookkeeping, the end.

    .venv/bin/python bench/startup.py [--code DIR] [--repeat 3] [--only STAGES] [--load N]

On a 50-image demo set (tiny-test), after one run that fills the cache, each figure is the median
of `--repeat` fresh all-cached `sdflow run tiny-test --only download,filter,caption` processes
(`--only ''`: every stage), in three ways of reaching the Prefect API:

- `running_server`: this PREFECT_HOME's background server already runs (`sdflow server
  --background`, or an earlier run started it);
- `cold_server`: a fresh PREFECT_HOME, so the run starts the background server and waits for it;
- `temporary`: SDFLOW_SERVER=temporary, Prefect's temporary server started and stopped by the run.

Each run is split by the marks `sdflow.ops.phases` writes (SDFLOW_PHASES): `import` (interpreter,
CLI, profile, `flows.pipeline` with Prefect), `api`, `flow_setup`, `stage_work` (the stages' own
seconds from summary.json), `stage_bookkeeping` (the rest of the stage loop: task runs, artifacts),
`end_report` (dataset report), `end_summary` (summary.json and its artifact), `flow_end` (Prefect
closes the flow run) and `shutdown` (the process's exit). Also `sdflow profiles`, `sdflow check`
and `import flows.pipeline`, whole-process seconds.

`--load N` starts N processes that each spin a core for the whole bench (a busy host); the targets
(issue 26: <= 5 s with a running server, <= 10 s cold, the end of a 50-row run under 1 s, on a
quiet machine) are scaled by 1 + N/2 (2 cores) and go to `bench/summary.py` with the load averages
seen at the start and the end (the machine may be shared: read ratios, not absolute seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from results import comparison, save  # bench/, beside this script

HERE = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers", "prefect")
TARGETS = {  # key: (what, target seconds on a quiet host; × (1 + N/2) under --load N on 2 cores)
    "profiles_s": ("`sdflow profiles`", 1.0),
    "check_s": ("`sdflow check tiny-test`", 1.0),
    "running_total_s": ("all-cached `sdflow run tiny-test`, running server", 5.0),
    "cold_total_s": ("all-cached `sdflow run tiny-test`, server started by the run", 10.0),
    "end_of_run_s": ("end-of-run work (report, summary), 50 rows", 1.0),
}


def _env(code: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "PYTHONPATH": str(code), "DO_NOT_TRACK": "1", **extra}


def timed(command: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
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


def run_phases(code: Path, tmp: Path, demo: str, home: Path, only: str, **env: str) -> dict:
    """One `sdflow run tiny-test` (all cached after the first); seconds per phase (see `split`)."""
    workdir, marks = tmp / "work", tmp / f"phases-{time.monotonic_ns()}.jsonl"
    extra = {"PREFECT_HOME": str(home), "SDFLOW_PHASES": str(marks), **env}
    args = ["run", "tiny-test", "--workdir", str(workdir), "--set", f"source.path={demo}"]
    launched = time.time()
    total = timed(sdflow(*args, *(["--only", only] if only else [])), _env(code, **extra), tmp)
    with open(marks) as lines:
        at = {json.loads(line)["phase"]: json.loads(line)["t"] - launched for line in lines}
    summary = json.loads(max((workdir / "runs").glob("*/summary.json")).read_text())
    stage_work = sum(s["seconds"] for s in summary["stages"].values())
    return split(at, total, stage_work)


def split(at: dict[str, float], total: float, stage_work: float) -> dict[str, float]:
    """Wall seconds of each phase of a run, from the marks of `sdflow.ops.phases`."""
    return {
        "total": total,
        "import": at["imported"],  # interpreter, sdflow.cli, the profile, flows.pipeline (Prefect)
        "api": at["api"] - at["imported"],  # the API found or started (the background server)
        "flow_setup": at["flow"] - at["api"],  # Prefect creates the flow run (+ a temporary server)
        "stage_work": stage_work,  # inside the stages' tasks (cache look-ups when all cached)
        "stage_bookkeeping": at["stages"] - at["flow"] - stage_work,  # task runs, artifacts
        "end_report": at["report"] - at["stages"],  # the dataset report, built and shown
        "end_summary": at["summary"] - at["report"],  # summary.json and its artifact
        "flow_end": at["returned"] - at["summary"],  # Prefect closes the flow run
        "shutdown": total - at["returned"],  # interpreter exit (a temporary server stops here)
    }


def overhead(code: Path, tmp: Path, demo: str, repeat: int, only: str) -> dict[str, dict]:
    """Median phases of `repeat` all-cached runs for each way of reaching the API."""
    temporary = {"SDFLOW_SERVER": "temporary"}
    run_phases(code, tmp, demo, tmp / "home-prime", only)  # fills the cache
    stop_background(code, tmp / "home-prime")  # its log: PREFECT_HOME/sdflow-server.log
    cases: dict[str, list[dict]] = {"running_server": [], "cold_server": [], "temporary": []}
    warm = tmp / "home-warm"
    failures: dict[str, list[str]] = {case: [] for case in cases}

    def attempt(case: str, home: Path, **env: str) -> None:
        try:
            cases[case].append(run_phases(code, tmp, demo, home, only, **env))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:  # counted, not fatal
            failures[case].append(str(exc).splitlines()[0][:200])

    try:
        for i in range(repeat):
            cold = tmp / f"home-cold-{i}"  # a fresh PREFECT_HOME: the run starts its server
            attempt("cold_server", cold)
            stop_background(code, cold)
            if i == 0:
                run_phases(code, tmp, demo, warm, only)  # starts the warm server
            attempt("running_server", warm)
            attempt("temporary", tmp / "home-tmp", **temporary)
    finally:
        stop_background(code, warm)
    return {
        case: {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
        | {"runs": len(runs), "failures": failures[case]}
        for case, runs in cases.items()
        if runs
    }


def stop_background(code: Path, home: Path) -> None:
    subprocess.run(sdflow("server", "--stop"), env=_env(code, PREFECT_HOME=str(home)),
                   capture_output=True, check=True, timeout=120)  # fmt: skip


@contextlib.contextmanager
def busy(n: int) -> Iterator[None]:
    """N processes that spin on a core each: a host that is busy with other work."""
    spin = [sys.executable, "-c", "while True: pass"]
    workers = [subprocess.Popen(spin) for _ in range(n)]
    try:
        yield
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()


def measure(code: Path, repeat: int, only: str, load: int) -> dict:
    median = statistics.median
    with tempfile.TemporaryDirectory(prefix="sdflow-startup-") as name, busy(load):
        tmp = Path(name)
        demo = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; from sdflow.data.sources.demo "
             f"import make_demo_dataset; print(make_demo_dataset(Path({str(tmp / 'demo')!r}), count=50))"],
            env=_env(code), capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()[-1]  # fmt: skip
        result: dict = {"load": load, "loadavg_start": os.getloadavg()[0], "only": only}
        result["profiles_s"] = median(
            timed(sdflow("profiles"), _env(code), tmp) for _ in range(repeat)
        )
        result["check_s"] = median(
            timed(sdflow("check", "tiny-test", "--set", f"source.path={demo}"), _env(code), tmp)
            for _ in range(repeat)
        )
        imports = [import_cost(code, tmp) for _ in range(repeat)]
        result["import_pipeline_s"] = median(seconds for seconds, _ in imports)
        result["import_pipeline_loads"] = imports[0][1]
        result["phases"] = overhead(code, tmp, demo, repeat, only)
        result["loadavg_end"] = os.getloadavg()[0]
    return _rounded(result)


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 2) if isinstance(value, float) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, default=HERE, help="the sdflow checkout to measure")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="download,filter,caption", help="'' for every stage")
    parser.add_argument("--load", type=int, default=0, help="busy processes running meanwhile")
    args = parser.parse_args()
    result = measure(args.code.resolve(), args.repeat, args.only, args.load)
    for case, split_s in result["phases"].items():
        print(f"  {case:<16}", "  ".join(f"{k} {v}" for k, v in split_s.items()))
    phases = result["phases"]
    figures = {
        "profiles_s": result["profiles_s"],
        "check_s": result["check_s"],
        "running_total_s": phases["running_server"]["total"],
        "cold_total_s": phases["cold_server"]["total"],
        "end_of_run_s": phases["running_server"]["end_report"]
        + phases["running_server"]["end_summary"],
    }
    suffix = f", load {args.load}" if args.load else ""
    rows = [
        comparison(f"{what}, median of {args.repeat}{suffix}", "s", figures[key], "target",
                   target * (1 + args.load / 2), goal=1.0, higher_is_better=False)
        for key, (what, target) in TARGETS.items()
    ]  # fmt: skip
    if "temporary" in phases:
        rows.append(
            comparison(f"all-cached run, temporary server{suffix}", "s",
                       phases["temporary"]["total"], "running server",
                       phases["running_server"]["total"], higher_is_better=False)
        )  # fmt: skip
    save("startup" + (f"-load{args.load}" if args.load else ""), "startup", rows, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
