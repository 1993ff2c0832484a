"""The kubernetes and slurm launchers, which cannot run here: their objects and scripts are checked
against what a cluster would check, their command line is the local launcher's, and their watchers
run on recorded API / sacct answers of a job's life cycle."""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.kube import deserialize, model_problems

from sdflow.config.distributed import KubernetesLauncher, SlurmLauncher
from sdflow.ops.deploy import K8S_TEMPLATE
from sdflow.ops.kubernetes import inherit_pool_template, jobset_manifest, watch_jobset
from sdflow.ops.launch import LaunchFailed
from sdflow.ops.slurm import sbatch_script, watch_job
from sdflow.ops.torchrun import torchrun_command

DATA = Path(__file__).parent / "data"
NAME = "sdflow-3f2a9c1d7e44"
SPEC = [f".sdflow-launch/{NAME}/spec.json"]
CLUSTER = KubernetesLauncher(
    namespace="training",
    image="registry.example/sdflow:0.4",
    gpus_per_node=8,
    workdir_claim="sdflow-workdir",
    node_selector={"nvidia.com/gpu.product": "NVIDIA-L4"},
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
)


def node_command(python: str = "python") -> list[str]:
    return torchrun_command(4, 8, NAME, 3, "sdflow.training.processes", SPEC, python)


def test_the_jobset_pods_are_valid_kubernetes_objects_running_the_local_command():
    pytest.importorskip("kubernetes")
    manifest = jobset_manifest(CLUSTER, NAME, 4, node_command(), max_restarts=3)
    job = manifest["spec"]["replicatedJobs"][0]["template"]
    assert model_problems(job, "V1JobTemplateSpec") == []
    read = deserialize(job, "V1JobTemplateSpec")  # the client's own reading: required fields, enums
    assert (read.spec.completion_mode, read.spec.completions, read.spec.parallelism) == (
        "Indexed",
        4,
        4,
    )
    pod = read.spec.template.spec
    assert pod.volumes[0].persistent_volume_claim.claim_name == "sdflow-workdir"
    assert pod.node_selector == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert pod.tolerations[0].key == "nvidia.com/gpu"
    (container,) = pod.containers
    assert container.resources.limits == {"nvidia.com/gpu": "8"}
    assert container.working_dir == container.volume_mounts[0].mount_path == "/workdir"
    # the same line as the local launcher's, with the image's python
    assert container.command[1:] == node_command(sys.executable)[1:]
    env = {e.name: e for e in container.env}
    # node 0's stable DNS name under the JobSet's headless service (pod <jobset>-<job>-<i>-<pod>)
    assert env["PET_RDZV_ENDPOINT"].value == f"{NAME}-node-0-0.{NAME}:29500"
    assert manifest["spec"]["network"] == {"enableDNSHostnames": True, "subdomain": NAME}
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["SDFLOW_NODE"].value_from.field_ref.field_path == index
    assert read.spec.backoff_limit == 12  # a lost pod may come back max_restarts times per node


def test_a_schema_check_that_can_fail_does():
    pytest.importorskip("kubernetes")
    job = jobset_manifest(CLUSTER, NAME, 2, node_command())["spec"]["replicatedJobs"][0]
    template = json.loads(json.dumps(job["template"]))
    template["spec"]["template"]["spec"]["containers"][0]["workdir"] = "/x"  # not a field
    template["spec"]["parallelism"] = "2"
    assert model_problems(template, "V1JobTemplateSpec") == [
        "$.spec.parallelism: '2' is not int",
        "$.spec.template.spec.containers[0].workdir: no such field in V1Container",
    ]


class Recorded:
    """A JobSet's life cycle as the API answered it, one poll at a time; deletes are recorded."""

    def __init__(self, answers: list[dict]):
        self.answers, self.at, self.deleted = answers, -1, []

    def get(self, name: str) -> dict:
        self.at += 1
        return self.answers[self.at]["jobset"]

    def node0_log(self, name: str) -> str | None:
        return self.answers[self.at]["node0_log"]

    def delete(self, name: str) -> None:
        self.deleted.append(name)


def lifecycle(kind: str) -> list[dict]:
    return json.loads((DATA / "jobset_lifecycle.json").read_text())[kind]


def collecting_log() -> tuple[logging.Logger, list[str]]:
    lines: list[str] = []
    log = logging.getLogger(f"sdflow.test-clusters.{id(lines)}")
    log.propagate = False
    log.setLevel(logging.INFO)
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    log.addHandler(handler)
    return log, lines


def test_the_watcher_follows_a_jobset_to_completion_and_logs_node_0_once():
    api, (log, lines) = Recorded(lifecycle("completed")), collecting_log()
    steps: list[str] = []
    watch_jobset(api, NAME, log, poll_s=0, on_line=steps.append, sleep=lambda s: None)
    assert api.at == 4 and api.deleted == []
    assert lines == [
        "buckets: {'square': 12}",
        "step 1/4 loss 1.18335 lr 0.001",
        "step 2/4 loss 0.94678 lr 0.001",
        "Saved checkpoint of step 2",
        "step 3/4 loss 0.89573 lr 0.001",
        "step 4/4 loss 0.84973 lr 0.001",
        "Saved checkpoint of step 4",
    ]
    assert steps == lines


def test_a_failed_jobset_fails_with_the_reason_and_a_replaced_pods_log():
    api, (log, lines) = Recorded(lifecycle("failed")), collecting_log()
    with pytest.raises(LaunchFailed, match="FailedJobs: jobset failed due to one or more job"):
        watch_jobset(api, NAME, log, poll_s=0, sleep=lambda s: None)
    # node 0's pod was replaced between polls: its new log is read from its start
    assert lines[-2:] == [
        "step 1/4 loss 1.0",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError",
    ]


SLURM = SlurmLauncher(
    partition="gpu", account="vision", gpus_per_node=8, setup=["module load cuda"]
)


def test_the_sbatch_script_parses_and_runs_the_local_torchrun_line(tmp_path):
    script = sbatch_script(SLURM, NAME, 4, node_command(), tmp_path, tmp_path / "out.txt")
    (tmp_path / "train.sbatch").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "train.sbatch")], check=True)
    torchrun = [line.strip() for line in script.splitlines() if "torch.distributed.run" in line]
    assert [shlex.split(line)[1:] for line in torchrun] == [node_command(sys.executable)[1:]]
    assert "#SBATCH --nodes=4" in script and "#SBATCH --gpus-per-node=8" in script


def test_the_sbatch_script_gives_each_node_its_index_and_node_0_as_endpoint(tmp_path):
    """Run the script's srun line with stand-ins for srun and scontrol: two nodes, as Slurm would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {  # srun runs its command once per node with SLURM_NODEID set
        "srun": 'shift; for i in 0 1; do SLURM_NODEID=$i "$@"; done',
        "scontrol": "printf 'gpu-a17\\ngpu-a18\\n'",
        "python": 'echo "node=$SDFLOW_NODE rank=$PET_NODE_RANK at=$PET_RDZV_ENDPOINT $*"',
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    script = sbatch_script(SlurmLauncher(), NAME, 2, node_command(), tmp_path, tmp_path / "o")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "gpu-a[17-18]"}
    out = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, check=True
    )
    line = shlex.join(node_command()[1:])
    assert out.stdout.splitlines() == [f"node={i} rank={i} at=gpu-a17:29500 {line}" for i in (0, 1)]


def test_the_slurm_watcher_logs_the_output_and_ends_with_the_job(tmp_path):
    output = tmp_path / "slurm.out"
    answers = iter(["", "PENDING\n", "RUNNING\n", "RUNNING\n", "COMPLETED\n"])
    writes = iter(["", "", "step 1/2 loss 1.0\n", "step 1/2 loss 1.0\nstep 2/2 loss 0.5\n", None])

    def sacct(argv: list[str]) -> str:
        assert argv[:3] == ["sacct", "-j", "4242"]
        text = next(writes)
        if text is not None:
            output.write_text(text)
        return next(answers)

    log, lines = collecting_log()
    watch_job("4242", output, log, 0, run=sacct, sleep=lambda s: None)
    assert lines == ["step 1/2 loss 1.0", "step 2/2 loss 0.5"]
    failed = iter(["RUNNING\n", "NODE_FAIL\n"])
    with pytest.raises(LaunchFailed, match="job state NODE_FAIL"):
        watch_job("4242", output, log, 0, run=lambda argv: next(failed), sleep=lambda s: None)


def test_the_jobset_pods_inherit_the_work_pools_hardening():
    """`sdflow deploy --pool-type kubernetes` creates the pool from this template; the training
    pods get its pod and container securityContext, with the template's defaults filled in."""
    pytest.importorskip("kubernetes")
    template = json.loads(K8S_TEMPLATE.read_text())
    manifest = inherit_pool_template(jobset_manifest(CLUSTER, NAME, 4, node_command()), template)
    job = manifest["spec"]["replicatedJobs"][0]["template"]
    assert model_problems(job, "V1JobTemplateSpec") == []
    pod = deserialize(job, "V1JobTemplateSpec").spec.template.spec
    assert (pod.security_context.run_as_non_root, pod.security_context.run_as_user) == (True, 1000)
    container = pod.containers[0].security_context
    assert (container.privileged, container.capabilities.drop) == (False, ["ALL"])
