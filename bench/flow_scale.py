"""The real Prefect flow at scale: download -> filter -> caption (keep) over an N-row loopback URL list.

    .venv/bin/python bench/flow_scale.py [--rows 100000] [--shard-size 1000] [--max-workers 4]

A separate process serves one small distinct JPEG per row from 127.0.0.1 (`serve_images` in
bench/download.py, the images of bench/data_scale.py). In a fresh temp workdir, `sdflow run PROFILE
--only download,filter,caption` runs the pipeline flow as a user would (own process, ephemeral
Prefect API whose SQLite database is in the temp dir), on a generated profile: the URL list, 64 px
JPEG, `caption.backend: keep`, the given shard size and runner threads. Then it reads what the run
recorded: `summary.json` (each stage's wall time as the flow saw it), each stage's manifest `info`
(`shard_busy_seconds`: the seconds during which at least one shard job ran, `sdflow.store.shardmap`) and
the Prefect database (task runs). It prints, per stage and overall, the share of wall time spent
outside shard work (orchestration, Prefect, manifests, fingerprints; and overall, process and API
start-up), rows/s, the task-run count and a JSON line. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from data_scale import serve, write_list  # bench/ is on sys.path when run as a script
from results import comparison, save

STAGES = ("download", "filter", "caption")
ROOT = Path(__file__).resolve().parents[1]


def profile_text(listing: Path, shard_size: int, max_workers: int) -> str:
    """A profile that reads `listing` and stops after caption(keep); the rest keeps its defaults."""
    return json.dumps(  # JSON is YAML
        {
            "description": "bench/flow_scale.py: data stages over a loopback URL list",
            "source": {"kind": "urls", "path": str(listing)},
            "download": {
                "resolution": 64,
                "resize_mode": "center_crop",
                "image_format": "jpeg",
                "allow_private_network": True,
                "shard_size": shard_size,
                "retries": 0,
            },
            "filter": {"min_size": 32},
            "caption": {"backend": "keep"},
            "runner": {"max_workers": max_workers},
        },
        indent=2,
    )


def outside_shares(
    summary: dict[str, Any], manifests: dict[str, dict[str, Any]], process_seconds: float
) -> dict[str, Any]:
    """Per stage: its wall time (`summary.json`), the seconds during which a shard job ran
    (manifest `info.shard_busy_seconds`) and the share of its wall time outside them; overall the
    same over the whole process (start-up, API, flow and stages), and rows/s of the run."""
    stages, busy_total = {}, 0.0
    for name in STAGES:
        wall = summary["stages"][name]["seconds"]
        busy = manifests[name]["info"]["shard_busy_seconds"]
        busy_total += busy
        stages[name] = {
            "seconds": round(wall, 2),
            "shard_busy_seconds": round(busy, 2),
            "outside_share": round(1 - busy / wall, 3) if wall > 0 else None,
            "shards": manifests[name]["info"]["shards_timed"],
        }
    flow = sum(stage["seconds"] for stage in stages.values())
    rows = manifests["download"]["counts"]["input"]
    return {
        "rows": rows,
        "process_seconds": round(process_seconds, 2),
        "stage_seconds": round(flow, 2),
        "stages": stages,
        "outside_share_stages": round(1 - busy_total / flow, 3),
        "outside_share_process": round(1 - busy_total / process_seconds, 3),
        "rows_per_second": round(rows / process_seconds, 1),
    }


def task_runs(database: Path) -> dict[str, int]:
    """Task runs the Prefect API recorded, by final state type."""
    with sqlite3.connect(database) as db:
        found = db.execute("SELECT state_type, count(*) FROM task_run GROUP BY state_type")
        return {str(state): count for state, count in found.fetchall()}


def run_flow(tmp: Path, profile: Path) -> tuple[float, float, Path]:
    """`sdflow run` in its own process with its own Prefect database: (launch time, seconds, run
    directory)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp / 'prefect.db'}",
        "DO_NOT_TRACK": "1",
        # on a loaded machine the ephemeral API takes longer than Prefect's 20 s default to start
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }
    env.pop("PREFECT_API_URL", None)  # the ephemeral API: what a plain `sdflow run` uses
    only = ",".join(STAGES)
    command = [sys.executable, "-m", "sdflow.cli", "run", str(profile), "--only", only]
    launched, started = time.time(), time.perf_counter()
    done = subprocess.run(
        [*command, "--workdir", str(tmp / "work")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"sdflow run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return launched, seconds, Path(done.stdout.strip().splitlines()[-1])


def measure(rows: int, shard_size: int, max_workers: int, port: int, tmp: Path) -> dict[str, Any]:
    listing = write_list(tmp / "urls.csv", port, rows)
    profile = tmp / "flow-scale.yaml"
    profile.write_text(profile_text(listing, shard_size, max_workers))
    launched, seconds, run_dir = run_flow(tmp, profile)
    summary = json.loads((run_dir / "summary.json").read_text())
    body = [datetime.fromisoformat(summary[k]).timestamp() for k in ("started_at", "finished_at")]
    manifests = {
        name: json.loads((Path(summary["stages"][name]["output"]) / "MANIFEST.json").read_text())
        for name in STAGES
    }
    result = outside_shares(summary, manifests, seconds)
    # summary.json's started_at / finished_at: when the flow body's tracker starts, and when it
    # finishes (after the stages, before the dataset report)
    result["until_flow_body_seconds"] = round(body[0] - launched, 1)  # imports, ephemeral API
    result["flow_body_seconds"] = round(body[1] - body[0], 1)  # stages and their modules' imports
    result["after_flow_body_seconds"] = round(launched + seconds - body[1], 1)  # report, shutdown
    result["kept"] = manifests["caption"]["counts"]["kept"]
    result["task_runs"] = task_runs(tmp / "prefect.db")
    result["shard_size"], result["max_workers"] = shard_size, max_workers
    return result


def report(result: dict[str, Any]) -> None:
    print(f"{result['rows']} rows ({result['kept']} kept), shards of {result['shard_size']}, "
          f"{result['max_workers']} runner threads: {result['process_seconds']} s, "
          f"{result['rows_per_second']} rows/s, task runs {result['task_runs']}")  # fmt: skip
    print(f"{'stage':>9} {'wall s':>8} {'shard busy s':>12} {'outside':>8} {'shards':>6}")
    for name, stage in result["stages"].items():
        print(f"{name:>9} {stage['seconds']:>8.1f} {stage['shard_busy_seconds']:>12.1f} "
              f"{stage['outside_share']:>8.1%} {stage['shards']:>6}")  # fmt: skip
    print(f"process: {result['until_flow_body_seconds']} s until the flow body starts (imports, "
          f"ephemeral API), {result['flow_body_seconds']} s of stages, "
          f"{result['after_flow_body_seconds']} s after them (dataset report, shutdown)")  # fmt: skip
    print(f"outside shard work: {result['outside_share_stages']:.1%} of the stages' wall time, "
          f"{result['outside_share_process']:.1%} of the whole process "
          f"(start-up and the ephemeral API included)")  # fmt: skip
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--max-workers", type=int, default=4, help="runner.max_workers")
    args = parser.parse_args()
    ready, counter = mp.Queue(), mp.Value("i", 0)
    server = mp.Process(target=serve, args=(ready, counter), daemon=True)
    server.start()
    try:
        port = ready.get(timeout=60)
        with tempfile.TemporaryDirectory(prefix="sdflow-flow-scale-") as tmp:
            result = measure(args.rows, args.shard_size, args.max_workers, port, Path(tmp))
        result["requests"] = counter.value
    finally:
        server.terminate()
    report(result)
    save(f"flow-scale-{args.rows}", "flow_scale", summary_rows(result), result)


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """sdflow's own figures for the combined table (no peer runs a Prefect flow here)."""
    rows = f"{result['rows']:,} URLs through download, filter, caption"
    return [
        comparison(f"{rows}: rows/s", "rows/s", result["rows_per_second"]),
        comparison(
            f"{rows}: stages' wall time outside shard work",
            "%",
            round(100 * result["outside_share_stages"], 1),
            higher_is_better=False,
        ),
    ]


if __name__ == "__main__":
    main()
