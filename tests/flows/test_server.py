"""sdflow operated through a real Prefect server: deployed, run by a process worker, retried.

The deployment run of tiny-test must complete with one task run per stage, the GPU stages tagged for
the `gpu` slot, library logs in the run's log and the run's artifacts (summary, failures, metrics,
progress, images). A run that fails in one stage, retried with `prefect flow-run retry`, must run only
that stage and what follows it; the stages before come back Cached.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys

import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

STAGES = ["download", "filter", "caption", "autoencoder", "latents", "train", "evaluate"]
GPU_STAGES = {"autoencoder", "latents", "train", "evaluate"}


def test_deployment_run_completes_with_each_stage(served_prefect, completed_run):
    task_runs = served_prefect.task_runs(completed_run)
    assert served_prefect.stage_states(completed_run) == {stage: "Completed" for stage in STAGES}
    gpu = {r["name"].rsplit("-", 1)[0] for r in task_runs if "gpu" in r["tags"]}  # only these
    assert gpu == GPU_STAGES
    limit = served_prefect.api("GET", "/concurrency_limits/tag/gpu")
    assert limit["concurrency_limit"] == 1

    loggers = {log["name"] for log in served_prefect.run_logs(completed_run)}
    assert {"tasks.latents", "sdflow.autoencoder"} <= loggers  # library logs reach the UI


def test_deployment_run_shows_its_artifacts(served_prefect, completed_run):
    by_key = {a["key"]: a for a in served_prefect.artifacts(completed_run) if a["key"]}
    summary = by_key["sdflow-tiny-test-summary"]
    assert summary["type"] == "markdown"
    assert "| download | completed | no |" in summary["data"]
    assert "| evaluate | completed | no |" in summary["data"]

    failures = json.loads(by_key["sdflow-tiny-test-failures"]["data"])
    assert {row["stage"] for row in failures} <= {"download", "filter", "-"}
    metrics = json.loads(by_key["sdflow-tiny-test-metrics"]["data"])
    assert [row["model"] for row in metrics] == ["trained", "baseline"]
    (run_dir,) = (served_prefect.workdir / "runs").glob(f"*-{completed_run[:8]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    for row in metrics:  # the UI shows the run's own scores (rounded to 4 places)
        assert row["fid"] == pytest.approx(summary["metrics"][row["model"]]["fid"], abs=1e-4)
    assert metrics[0]["fid"] != metrics[1]["fid"]  # two models, two scores

    for stage in ("download", "latents", "train"):
        progress = by_key[f"sdflow-{stage}-progress"]
        assert progress["type"] == "progress" and float(progress["data"]) == 100.0

    report = by_key["sdflow-tiny-test-dataset-report"]  # tests/test_report.py checks the HTML
    assert report["type"] == "markdown"
    encoded = summary["stages"]["latents"]["counts"]["encoded"]
    assert f"| encoded | latents | {encoded} |" in report["data"]
    assert summary["dataset_report"] in report["data"]

    for name in ("sample-grid", "loss-curve", "dataset-width", "dataset-caption-length"):
        artifact = by_key[f"sdflow-tiny-test-{name}"]
        assert artifact["type"] == "image"
        prefix = "data:image/png;base64,"
        assert artifact["data"].startswith(prefix)
        image = Image.open(io.BytesIO(base64.b64decode(artifact["data"][len(prefix) :])))
        assert image.width > 32 and image.height > 32


def test_retry_reruns_only_the_failed_stage_and_what_follows(
    served_prefect, completed_run, demo_folder, tmp_path
):
    # Break what the latents stage reads (the caption shards), and change latents so it must run.
    (manifest,) = (served_prefect.workdir / "stages" / "caption").glob("*/MANIFEST.json")
    caption = manifest.parent
    shards = sorted(caption.glob("shard-*.parquet"))
    hidden = tmp_path / "caption-shards"
    hidden.mkdir()
    for shard in shards:
        shutil.move(shard, hidden / shard.name)
    parameters = served_prefect.tiny_test(demo_folder, "latents.batch_size=16")
    flow_run_id = served_prefect.run_deployment("sdflow-pipeline/manual", parameters)
    failed = served_prefect.wait(flow_run_id)
    assert failed["state_type"] == "FAILED"
    assert served_prefect.stage_states(flow_run_id) == {
        "download": "Cached",
        "filter": "Cached",
        "caption": "Cached",
        "autoencoder": "Cached",
        "latents": "Failed",
    }

    for shard in shards:
        shutil.move(hidden / shard.name, shard)
    retry = [sys.executable, "-m", "prefect", "flow-run", "retry", flow_run_id]
    done = subprocess.run(
        retry, env=served_prefect.env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    retried = served_prefect.wait(flow_run_id)
    assert retried["state_type"] == "COMPLETED", served_prefect.tail()
    assert retried["run_count"] == 2

    assert served_prefect.stage_states(flow_run_id, attempt=2) == {
        "download": "Cached",
        "filter": "Cached",
        "caption": "Cached",
        "autoencoder": "Cached",
        "latents": "Completed",
        "train": "Completed",
        "evaluate": "Completed",
    }


def test_stage_deployment_reruns_just_that_stage(served_prefect, completed_run, demo_folder):
    parameters = {**served_prefect.tiny_test(demo_folder), "refresh": True}
    flow_run_id = served_prefect.run_deployment("sdflow-filter/manual", parameters)
    assert served_prefect.wait(flow_run_id)["state_type"] == "COMPLETED", served_prefect.tail()
    assert served_prefect.stage_states(flow_run_id) == {"filter": "Completed"}  # rebuilt, alone


def test_user_error_fails_once_with_one_paragraph(served_prefect, completed_run, demo_folder):
    parameters = served_prefect.tiny_test(demo_folder, "filter.min_size=4096")  # nothing is kept
    flow_run_id = served_prefect.run_deployment("sdflow-pipeline/manual", parameters)
    assert served_prefect.wait(flow_run_id)["state_type"] == "FAILED"
    assert served_prefect.stage_states(flow_run_id) == {"download": "Cached", "filter": "Failed"}
    (filter_run,) = [
        r for r in served_prefect.task_runs(flow_run_id) if r["name"].rsplit("-", 1)[0] == "filter"
    ]
    assert filter_run["run_count"] == 1  # not retried
    prefix = "Stage filter stopped on a problem to fix"
    (paragraph,) = served_prefect.messages_starting(flow_run_id, prefix)
    assert "not retried" in paragraph and "\n" not in paragraph.strip()


def test_a_foreign_web_page_cannot_start_runs_or_register_deployments(served_prefect):
    """What a page on http://evil.example could send to the server on 127.0.0.1 is refused."""
    api, evil = f"{served_prefect.url}/api", {"Origin": "http://evil.example"}
    deployment = served_prefect.api("GET", "/deployments/name/sdflow-pipeline/manual")
    runs_before = served_prefect.api("POST", "/flow_runs/count", json={})

    start = httpx.post(
        f"{api}/deployments/{deployment['id']}/create_flow_run", json={}, headers=evil, timeout=30
    )
    assert start.status_code == 403 and "CSRF" in start.text
    forged = {**evil, "Prefect-Csrf-Token": "guess", "Prefect-Csrf-Client": "evil"}
    register = httpx.post(
        f"{api}/deployments/",
        json={"name": "evil", "flow_id": deployment["flow_id"]},
        headers=forged,
        timeout=30,
    )
    assert register.status_code == 403
    assert served_prefect.api("POST", "/flow_runs/count", json={}) == runs_before

    # The browser lets a page read a token, or send the CSRF headers, only if CORS allows its origin.
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "prefect-csrf-token,prefect-csrf-client,content-type",
    }
    refused = httpx.options(f"{api}/flow_runs/filter", headers={**evil, **preflight}, timeout=30)
    assert refused.status_code >= 400 and "access-control-allow-origin" not in refused.headers
    token = httpx.get(f"{api}/csrf-token", params={"client": "x"}, headers=evil, timeout=30)
    assert "access-control-allow-origin" not in token.headers
    own = {"Origin": served_prefect.url, **preflight}
    allowed = httpx.options(f"{api}/flow_runs/filter", headers=own, timeout=30)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == served_prefect.url

    # Prefect's own client fetches tokens: the CLI still changes things.
    command = [sys.executable, "-m", "prefect", "concurrency-limit", "create", "csrf-probe", "3"]
    done = subprocess.run(
        command, env=served_prefect.env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert served_prefect.api("GET", "/concurrency_limits/tag/csrf-probe")["concurrency_limit"] == 3
