"""Deployments and the server command, without a server (fast checks).

The real server, worker, retry and browser are in tests/flows/test_server.py and test_ui.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fixtures.kube import rendered_pool_job
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.callables import parameter_schema

from sdflow.config import STAGES
from sdflow.ops.deploy import K8S_TEMPLATE, PREFECT_FILE, ROOT, plan_deploy
from sdflow.ops.orchestration import GPU_STAGES, result_storage, stage_task
from sdflow.ops.server import HOST, server_command, server_env
from sdflow.profiles import load_profile


def _deployments() -> list[dict]:
    return yaml.safe_load(PREFECT_FILE.read_text())["deployments"]


def test_every_deployment_loads_its_flow_with_valid_parameters(monkeypatch):
    monkeypatch.chdir(ROOT)  # entrypoints are relative to the repository root
    flows = {}
    for deployment in _deployments():
        flow = flows.get(deployment["entrypoint"]) or load_flow_from_entrypoint(
            deployment["entrypoint"]
        )
        flows[deployment["entrypoint"]] = flow
        allowed = set(parameter_schema(flow).properties)
        assert set(deployment["parameters"]) <= allowed, deployment["name"]
        load_profile(deployment["parameters"]["profile"])  # the profile exists and validates
        assert "sdflow" in deployment["tags"] and deployment["work_pool"]["name"]
    names = {f.name for f in flows.values()}
    assert names == {"sdflow-pipeline", "sdflow-sweep"} | {f"sdflow-{stage}" for stage in STAGES}


def test_example_schedules_and_library_logs():
    by_name = {d["name"]: d for d in _deployments() if "schedules" in d}
    assert by_name["nightly-data"]["parameters"]["only"][-1] == "latents"
    assert by_name["nightly-data"]["schedules"][0]["cron"] == "0 2 * * *"
    assert by_name["weekly-finetune"]["parameters"]["profile"] == "sd15-lora-12gb"
    for deployment in _deployments():
        loggers = deployment["work_pool"]["job_variables"]["env"]["PREFECT_LOGGING_EXTRA_LOGGERS"]
        assert {"diffusers", "accelerate", "transformers", "sdflow"} <= set(loggers.split(","))


def test_kubernetes_template_requests_a_gpu_and_mounts_the_work_volume():
    template = json.loads(K8S_TEMPLATE.read_text())
    job = template["job_configuration"]["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert container["volumeMounts"][0]["mountPath"] == "/data"
    claim = job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    variables = template["variables"]["properties"]
    assert claim == "{{ work_volume_claim }}" and variables["gpus"]["default"] == 1
    assert "PREFECT_LOGGING_EXTRA_LOGGERS" in variables["env"]["default"]
    placeholders = {"command", "env", "labels", "name", "namespace", "image", "gpus", "cpu"}
    assert placeholders <= set(variables)  # every {{ name }} in the manifest has a variable


def test_kubernetes_job_runs_unprivileged_from_a_pinned_image():
    pod = rendered_pool_job({})["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000  # an int, as Kubernetes requires
    assert pod["securityContext"]["fsGroup"] == 1000
    container = pod["containers"][0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["image"] == "registry.example/sdflow@sha256:<digest>"
    pinned = "ghcr.io/me/sdflow@sha256:" + "ab" * 32
    pod = rendered_pool_job({"image": pinned, "run_as_user": 4242})["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == pinned
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsGroup"] == 4242


def test_plan_defaults_local_and_kubernetes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = plan_deploy("sdflow", "process", None, None, gpus=2)
    assert local.workdir == str(tmp_path / "sdflow-work") and local.code_dir == str(ROOT)
    assert local.gpus == 2
    k8s = plan_deploy("gpu-cluster", "kubernetes", None, None, gpus=8)
    assert (k8s.workdir, k8s.code_dir) == ("/data/sdflow-work", "/opt/sdflow")
    assert plan_deploy("p", "process", "rel", None, gpus=None).gpus >= 1  # this host's, at least 1


def test_deploy_without_a_server_is_a_user_error(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PREFECT_HOME": str(tmp_path), "HOME": str(tmp_path)}
    command = [sys.executable, "-m", "sdflow.cli", "deploy", "--gpus", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "needs a running Prefect server" in result.stderr and "Traceback" not in result.stderr


def test_server_binds_loopback_with_sqlite_under_the_workdir(tmp_path):
    env = server_env(tmp_path, 4321, environ={})
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].endswith(f"{tmp_path}/prefect/prefect.db")
    assert env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4321/api"
    assert server_command(4321)[-4:] == ["--host", HOST, "--port", "4321"] and HOST == "127.0.0.1"
    assert env["PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"] == "true"
    origins = env["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"].split(",")
    assert origins == ["http://127.0.0.1:4321", "http://localhost:4321"]
    postgres = "postgresql+asyncpg://sdflow:secret@db:5432/prefect"
    own = server_env(tmp_path, 4321, environ={"PREFECT_API_DATABASE_CONNECTION_URL": postgres})
    assert own["PREFECT_API_DATABASE_CONNECTION_URL"] == postgres


def test_result_storage_defaults_to_the_workdir(tmp_path):
    assert result_storage(None, tmp_path) == tmp_path.resolve() / "prefect-results"
    assert result_storage("cache", tmp_path) == tmp_path.resolve() / "cache"
    assert result_storage("/shared/results", tmp_path) == Path("/shared/results")
    assert result_storage("s3-bucket/sdflow-results", tmp_path) == "s3-bucket/sdflow-results"


def test_gpu_stages_carry_the_gpu_tag():
    def key(config, upstream):
        return "k"

    for stage in STAGES:
        task = stage_task(stage, key)(lambda config, upstream, workdir: {})
        assert ("gpu" in task.tags) == (stage in GPU_STAGES)
    assert {"autoencoder", "class_images", "latents", "train", "evaluate"} == GPU_STAGES


@pytest.mark.parametrize("command", [["deploy", "--help"], ["server", "--help"]])
def test_commands_are_listed(command):
    result = subprocess.run(
        [sys.executable, "-m", "sdflow.cli", *command], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "usage: sdflow" in result.stdout


def test_deploy_to_a_server_that_is_down_is_a_user_error(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "PREFECT_HOME": str(tmp_path),
        "HOME": str(tmp_path),
        "PREFECT_API_URL": "http://127.0.0.1:9/api",  # the discard port: nothing listens
    }
    command = [sys.executable, "-m", "sdflow.cli", "deploy", "--gpus", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "No Prefect server answers" in result.stderr and "Traceback" not in result.stderr
