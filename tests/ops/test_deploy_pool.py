"""`sdflow deploy --pool-type kubernetes`: the work pool it creates on a real Prefect server, and
the Job its base job template renders, checked against Kubernetes' JobSpec schema (as the pinned
JobSet CRD inlines it, tests/ops/data/README.md). The JobSet's training pods inherit this template's
hardening (tests/ops/test_launch_clusters.py)."""

from __future__ import annotations

import json
import shlex

import pytest
from fixtures.kube import job_spec_problems, rendered_pool_job

from sdflow.errors import UserError
from sdflow.ops.deploy import K8S_TEMPLATE, ensure_work_pool


def test_the_kubernetes_pool_is_created_once_with_the_template(prefect_server, capsys):
    from prefect.client.orchestration import get_client

    ensure_work_pool("gpu-cluster-test", "kubernetes")
    ensure_work_pool("gpu-cluster-test", "kubernetes")  # a second deploy leaves it as it is
    assert capsys.readouterr().out.splitlines() == [
        "created work pool 'gpu-cluster-test' (kubernetes)",
        "work pool 'gpu-cluster-test' (kubernetes) exists; left as it is",
    ]
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("gpu-cluster-test")
    assert pool.type == "kubernetes"
    assert pool.base_job_template == json.loads(K8S_TEMPLATE.read_text())
    with pytest.raises(UserError, match="exists with type 'kubernetes', not 'process'"):
        ensure_work_pool("gpu-cluster-test", "process")


def test_the_pools_job_is_a_valid_kubernetes_job():
    """Rendered as a Kubernetes worker renders it: Prefect's templating, then the worker's own
    steps (the env mapping becomes a list, the command string the container's args)."""
    values = {"name": "sdflow-run", "command": "prefect flow-run execute", "labels": {"a": "b"}}
    job = rendered_pool_job(values | {"service_account_name": "sdflow"})
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": k, "value": v} for k, v in container["env"].items()]
    container["args"] = shlex.split(container["args"])
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert job_spec_problems(job["spec"]) == []
    job["spec"]["template"]["spec"]["parallelism"] = 1  # a Job's field, misplaced in its pod
    assert job_spec_problems(job["spec"]) == [
        "$.template.spec: Additional properties are not allowed ('parallelism' was unexpected)"
    ]
