"""`runner.train_launcher: kubernetes`: the train stage's nodes as a JobSet, watched until done.

`jobset_manifest` builds a JobSet (jobset.x-k8s.io/v1alpha2) of one replicated Job: an Indexed Job
of `train.nodes` pods (completions = parallelism = nodes), each running the same torchrun line
(`sdflow.ops.torchrun.torchrun_command`) in the shared workdir, a ReadWriteMany claim mounted on
every pod. The JobSet controller gives the pods stable DNS names through a headless service
(`network.enableDNSHostnames`), so node 0 is `<name>-node-0-0.<name>` and every pod's
`PET_RDZV_ENDPOINT` points there; the pod's completion index is `SDFLOW_NODE` and torchrun's node
rank variable. A pod lost with its machine is replaced by the Job (backoffLimit: max_restarts per
node) and rejoins the rendezvous; the torchrun agents restart every worker from the newest checkpoint.

`run_jobset` submits it through the Kubernetes API (`pip install -e '.[kubernetes]'`), polls its
status, streams node 0's log into the stage's log, and deletes the JobSet on every way out but
success (a failed one is kept for `kubectl describe`; `ttlSecondsAfterFinished` removes it later),
so a cancelled Prefect run leaves no pods training. `watch_jobset` works on any object with the
three methods of `JobSetApi`, which is how the tests replay recorded API responses.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from sdflow.config.distributed import KubernetesLauncher
from sdflow.errors import UserError
from sdflow.ops.deploy import K8S_TEMPLATE
from sdflow.ops.launch import LaunchFailed, OutputLog
from sdflow.ops.torchrun import AGENT_ENV, ENDPOINT_ENV, NODE_ENV

GROUP, VERSION, PLURAL = "jobset.x-k8s.io", "v1alpha2", "jobsets"
REPLICATED_JOB = "node"
CONTAINER = "train"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"
KEEP_FINISHED_S = 24 * 3600


def jobset_manifest(
    cluster: KubernetesLauncher, name: str, nodes: int, cmd: Sequence[str], max_restarts: int = 0
) -> dict[str, Any]:
    """The JobSet that runs `cmd` on `nodes` pods (see the module doc)."""
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container(cluster, name, cmd)],
        "volumes": [
            {"name": "workdir", "persistentVolumeClaim": {"claimName": cluster.workdir_claim}}
        ],
    }
    if cluster.node_selector:
        pod_spec["nodeSelector"] = dict(cluster.node_selector)
    if cluster.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in cluster.tolerations]
    if cluster.service_account:
        pod_spec["serviceAccountName"] = cluster.service_account
    job_spec = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": max_restarts * nodes,
        "template": {
            "metadata": {"labels": {"app.kubernetes.io/name": "sdflow"}},
            "spec": pod_spec,
        },
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "JobSet",
        "metadata": {"name": name, "namespace": cluster.namespace, "labels": {"sdflow/run": name}},
        "spec": {
            "network": {"enableDNSHostnames": True, "subdomain": name},
            "replicatedJobs": [
                {"name": REPLICATED_JOB, "replicas": 1, "template": {"spec": job_spec}}
            ],
            "successPolicy": {"operator": "All"},
            "failurePolicy": {"maxRestarts": 0},
            "ttlSecondsAfterFinished": KEEP_FINISHED_S,
        },
    }


def inherit_pool_template(manifest: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    """The JobSet's pods take the work pool's hardening: the pod and container securityContext of
    its base job template (`sdflow deploy --pool-type kubernetes`), with the template's variable
    defaults filled in, so the training pods run as unprivileged as the flow-run pod."""
    defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    pool_pod = _fill(
        template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"], defaults
    )
    pod = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    if "securityContext" in pool_pod:
        pod["securityContext"] = pool_pod["securityContext"]
    if "securityContext" in pool_pod["containers"][0]:
        pod["containers"][0]["securityContext"] = pool_pod["containers"][0]["securityContext"]
    return manifest


def _fill(value: Any, defaults: dict[str, Any]) -> Any:
    """A Prefect job template value with each whole `{{ variable }}` replaced by its default."""
    if isinstance(value, dict):
        return {k: _fill(v, defaults) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, defaults) for v in value]
    if isinstance(value, str) and value.startswith("{{") and value.endswith("}}"):
        return defaults.get(value[2:-2].strip())
    return value


def container(cluster: KubernetesLauncher, name: str, cmd: Sequence[str]) -> dict[str, Any]:
    """The training container: torchrun in the workdir mount, node 0 as rendezvous endpoint."""
    index = {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}
    endpoint = f"{name}-{REPLICATED_JOB}-0-0.{name}:{cluster.rendezvous_port}"
    limits = {"nvidia.com/gpu": str(cluster.gpus_per_node)} if cluster.gpus_per_node else {}
    return {
        "name": CONTAINER,
        "image": cluster.image,
        "command": list(cmd),
        "workingDir": cluster.workdir_mount,
        "env": [
            {"name": ENDPOINT_ENV, "value": endpoint},
            {"name": NODE_ENV, "valueFrom": index},
            {"name": "PET_NODE_RANK", "valueFrom": index},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            *({"name": key, "value": value} for key, value in AGENT_ENV.items()),
        ],
        "ports": [{"containerPort": cluster.rendezvous_port, "name": "rendezvous"}],
        "resources": {
            "requests": {"cpu": cluster.cpu, "memory": cluster.memory},
            "limits": limits,
        },
        "volumeMounts": [{"name": "workdir", "mountPath": cluster.workdir_mount}],
    }


class JobSetApi(Protocol):
    def get(self, name: str) -> dict[str, Any]: ...
    def node0_log(self, name: str) -> str | None: ...
    def delete(self, name: str) -> None: ...


def finished(jobset: dict[str, Any]) -> str | None:
    """ "Completed" or "Failed" once the JobSet controller says so (a True condition), else None."""
    for condition in jobset.get("status", {}).get("conditions", []):
        if condition.get("type") in ("Completed", "Failed") and condition.get("status") == "True":
            return condition["type"]
    return None


def watch_jobset(
    api: JobSetApi,
    name: str,
    log: logging.Logger,
    poll_s: float,
    on_line: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Poll until the JobSet completes (return) or fails (LaunchFailed), logging node 0's output."""
    output = OutputLog(log, on_line=on_line)
    logged = 0  # characters of node 0's log already logged (the API returns it from the start)
    while True:
        jobset = api.get(name)
        text = api.node0_log(name) or ""
        if len(text) < logged:  # node 0's pod was replaced: its log starts afresh
            logged = 0
        output.feed(text[logged:].encode())
        logged = len(text)
        if state := finished(jobset):
            output.close()
            if state == "Failed":
                reason = _failed_reason(jobset)
                raise LaunchFailed([f"jobset/{name}"], 1, [*output.tail, reason])
            return
        sleep(poll_s)


def _failed_reason(jobset: dict[str, Any]) -> str:
    conditions = jobset.get("status", {}).get("conditions", [])
    said = [f"{c.get('reason')}: {c.get('message')}" for c in conditions if c["type"] == "Failed"]
    return f"JobSet failed ({'; '.join(said)})"


def run_jobset(
    cluster: KubernetesLauncher,
    name: str,
    nodes: int,
    cmd: Sequence[str],
    log: logging.Logger,
    max_restarts: int = 0,
    on_line: Callable[[str], None] | None = None,
) -> None:
    """Submit, watch, and on any way out but success or failure (a cancellation) delete."""
    api = KubeJobSetApi(cluster.namespace)
    manifest = jobset_manifest(cluster, name, nodes, cmd, max_restarts)
    api.create(inherit_pool_template(manifest, json.loads(K8S_TEMPLATE.read_text())))
    log.info("Submitted JobSet %s/%s: %d pods", cluster.namespace, name, nodes)
    done = False
    try:
        watch_jobset(api, name, log, cluster.poll_s, on_line)
        done = True
    except LaunchFailed:
        done = True  # kept for inspection; its TTL removes it
        raise
    finally:
        if not done:
            api.delete(name)
            log.info("Deleted JobSet %s/%s", cluster.namespace, name)


class KubeJobSetApi:
    """`JobSetApi` through the official client, in-cluster or from the kubeconfig."""

    def __init__(self, namespace: str):
        try:
            from kubernetes import client, config
        except ImportError:
            raise UserError(
                "runner.train_launcher is 'kubernetes' but the kubernetes client is not installed: "
                "pip install -e '.[kubernetes]'"
            ) from None
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self.namespace = namespace
        self.custom, self.core = client.CustomObjectsApi(), client.CoreV1Api()

    def create(self, manifest: dict[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, manifest
        )

    def get(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )

    def node0_log(self, name: str) -> str | None:
        selector = f"{JOBSET_LABEL}={name},{INDEX_ANNOTATION}=0"
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        running = [p for p in pods if p.status.phase in ("Running", "Succeeded", "Failed")]
        if not running:
            return None
        newest = max(running, key=lambda p: p.metadata.creation_timestamp)
        return self.core.read_namespaced_pod_log(
            newest.metadata.name, self.namespace, container=CONTAINER
        )

    def delete(self, name: str) -> None:
        body = {"propagationPolicy": "Foreground"}
        self.custom.delete_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, body=body
        )
