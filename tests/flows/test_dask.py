"""Data stages mapped over shards: a local Dask cluster, a process pool, the thread pool and a plain
call agree.

Each shard job reads its inputs from disk and writes its shard into the partial directory, so the
stage outputs must be byte-identical (same fingerprints) whichever runner ran the jobs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import FlowRunSort

from sdflow.cli import main
from sdflow.profiles import load_profile
from tasks.caption import caption_samples
from tasks.download import download
from tasks.filter import filter_samples

DATA = ["download", "filter", "caption"]
SMALL = ["download.shard_size=32", "runner.max_workers=2"]  # 240 images: 8 shards per stage


def run_flow(workdir: Path, source: Path, *overrides: str) -> dict:
    """`sdflow run tiny-test --only download,filter,caption`; returns summary.json."""
    args = ["run", "tiny-test", "--workdir", str(workdir), "--only", ",".join(DATA)]
    for value in [f"source.path={source}", *SMALL, *overrides]:
        args += ["--set", value]
    assert main(args) == 0
    (summary,) = (workdir / "runs").glob("*/summary.json")
    return json.loads(summary.read_text())


def fingerprints(summary: dict) -> dict[str, str]:
    out = {}
    for stage in DATA:
        manifest = json.loads(
            (Path(summary["stages"][stage]["output"]) / "MANIFEST.json").read_text()
        )
        out[stage] = manifest["fingerprint"]
    return out


@pytest.fixture(scope="module")
def dask_cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=":0",  # a free loopback port
    ) as cluster:
        yield cluster


@pytest.mark.slow
def test_dask_threads_and_a_plain_call_write_identical_stage_outputs(
    prefect_server, demo_folder, dask_cluster, tmp_path
):
    config = load_profile("tiny-test", [f"source.path={demo_folder}", *SMALL])
    plain = tmp_path / "plain"
    downloaded = download(config, {}, str(plain))
    filtered = filter_samples(config, {"download": downloaded}, str(plain))
    captioned = caption_samples(config, {"filter": filtered}, str(plain))
    expected = {
        "download": downloaded["fingerprint"],
        "filter": filtered["fingerprint"],
        "caption": captioned["fingerprint"],
    }
    assert len(downloaded["shards"]) == 8

    threads = run_flow(tmp_path / "threads", demo_folder)
    assert fingerprints(threads) == expected
    processes = run_flow(tmp_path / "processes", demo_folder, "runner.task_runner=processes")
    assert fingerprints(processes) == expected
    for stage in DATA:  # every shard ran in the threads of one process, or in the 2 workers
        assert shard_processes(threads, stage) == 1 and shard_processes(processes, stage) == 2

    address = dask_cluster.scheduler_address
    on_dask = run_flow(
        tmp_path / "dask", demo_folder, "runner.task_runner=dask", f"runner.dask_address={address}"
    )
    assert fingerprints(on_dask) == expected
    for stage in DATA:  # the same counts, at another speed
        ours, theirs = (run["stages"][stage]["counts"] for run in (on_dask, threads))
        assert ours == theirs
    # the shard jobs went to the cluster (its worker processes), and show in Prefect as tasks
    jobs = {"download_shard", "check_one_shard", "caption_one_shard"}
    assert jobs <= set(dask_cluster.scheduler.task_prefixes)
    for names in shard_runs_of_last_flow_runs(2):
        for stage in DATA:
            assert sorted(n for n in names if n.startswith(f"{stage}-shard-")) == [
                f"{stage}-shard-{i}" for i in range(8)
            ]


@pytest.mark.slow
def test_worker_processes_report_to_the_ephemeral_api_of_a_plain_run(demo_folder, tmp_path):
    """Without PREFECT_API_URL and with SDFLOW_SERVER=temporary, `sdflow run` starts one temporary
    Prefect server: the shard tasks in worker processes report to it instead of each starting (and
    keeping runs in) its own. (The default, a background server, is tests/ops/test_background.py's.)"""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    env |= {"SDFLOW_SERVER": "temporary"}
    sets = [f"source.path={demo_folder}", "download.shard_size=120", "runner.max_workers=2"]
    command = [sys.executable, "-m", "sdflow.cli", "run", "tiny-test", "--only", "download"]
    command += ["--workdir", str(tmp_path / "work"), "--set", "runner.task_runner=processes"]
    for value in sets:
        command += ["--set", value]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert log.count("Starting temporary server") == 1, log[-3000:]
    assert sorted(
        line.split("'")[1] for line in log.splitlines() if "'download-shard-" in line
    ) == [
        "download-shard-0",
        "download-shard-1",
    ]
    (manifest,) = (tmp_path / "work" / "stages" / "download").glob("*/MANIFEST.json")
    assert json.loads(manifest.read_text())["info"]["shard_processes"] == 2


def shard_processes(summary: dict, stage: str) -> int:
    manifest = Path(summary["stages"][stage]["output"]) / "MANIFEST.json"
    return json.loads(manifest.read_text())["info"]["shard_processes"]


def shard_runs_of_last_flow_runs(count: int) -> list[list[str]]:
    """Task run names of the `count` latest flow runs (this session runs flows one at a time)."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=count)
        return [
            [
                task_run.name
                for task_run in client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
                )
            ]
            for run in runs
        ]
