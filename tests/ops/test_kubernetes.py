"""The JobSet `sdflow.ops.kubernetes` builds, validated against the JobSet CRD's published
`openAPIV3Schema` (tests/ops/data/README.md: release v0.12.0, pinned by commit and hash), which
inlines Kubernetes' Job and Pod schemas; and the environment every launcher gives torchrun's agents
(`AGENT_ENV`, without which an elastic restart reads the previous round's store keys)."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

from fixtures.kube import JOBSET_API, jobset_problems

from sdflow.config.distributed import KubernetesLauncher, SlurmLauncher
from sdflow.ops.deploy import K8S_TEMPLATE
from sdflow.ops.kubernetes import inherit_pool_template, jobset_manifest
from sdflow.ops.slurm import sbatch_script
from sdflow.ops.torchrun import AGENT_ENV, local_node_envs, torchrun_command

NAME = "sdflow-3f2a9c1d7e44"
CLUSTER = KubernetesLauncher(
    namespace="training",
    image="registry.example/sdflow@sha256:" + "ab" * 32,
    gpus_per_node=8,
    workdir_claim="sdflow-workdir",
    node_selector={"nvidia.com/gpu.product": "NVIDIA-L4"},
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    service_account="sdflow-train",
)
CMD = torchrun_command(
    4, 8, NAME, 2, "sdflow.training.processes", [f"x/{NAME}/spec.json"], "python"
)


def jobset() -> dict:
    """The JobSet of a 4-node run, with the work pool's hardening, as `run_jobset` submits it."""
    manifest = jobset_manifest(CLUSTER, NAME, 4, CMD, max_restarts=2)
    return inherit_pool_template(manifest, json.loads(K8S_TEMPLATE.read_text()))


def test_the_jobset_is_valid_against_the_published_jobset_crd():
    manifest = jobset()
    assert manifest["apiVersion"] == JOBSET_API  # the version the pinned CRD serves
    assert jobset_problems(manifest) == []


def test_a_crd_check_that_can_fail_does():
    manifest = copy.deepcopy(jobset())
    spec = manifest["spec"]
    spec["network"]["enableDNSHostnames"] = "true"  # a string, not a boolean
    spec["replicatedJobs"][0]["replica"] = 1  # not a field of a ReplicatedJob
    pod = spec["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = [8]  # not a quantity
    del pod["containers"][0]["name"]  # required
    assert jobset_problems(manifest) == sorted(
        [
            "$.spec.network.enableDNSHostnames: 'true' is not of type 'boolean'",
            "$.spec.replicatedJobs.0.template.spec.template.spec.containers.0: 'name' is a required "
            "property",
            "$.spec.replicatedJobs.0.template.spec.template.spec.containers.0.resources.limits."
            "nvidia.com/gpu: [8] is not valid under any of the given schemas",
            "$.spec.replicatedJobs.0: Additional properties are not allowed ('replica' was unexpected)",
        ]
    )


def test_every_launcher_gives_the_agents_a_fresh_store_each_rendezvous_round(tmp_path: Path):
    assert AGENT_ENV == {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    for env in local_node_envs(2, 29400, {"PATH": "/bin"}):  # local
        assert env.items() >= AGENT_ENV.items()
    (container,) = jobset()["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
        "containers"
    ]  # kubernetes
    assert {e["name"]: e.get("value") for e in container["env"]}.items() >= AGENT_ENV.items()
    bin_dir = tmp_path / "bin"  # slurm: the script's srun line, with stand-ins for Slurm's tools
    bin_dir.mkdir()
    fakes = {"srun": 'shift; "$@"', "scontrol": "echo gpu-a17", "python": "env"}
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    script = sbatch_script(SlurmLauncher(), NAME, 2, CMD, tmp_path, tmp_path / "out")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "gpu-a17", "SLURM_NODEID": "0"}
    out = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, check=True
    )
    printed = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert printed.items() >= AGENT_ENV.items()
