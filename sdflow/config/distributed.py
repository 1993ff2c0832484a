"""Training past one process: nodes, sharding, elastic restarts (`train.*`), and the clusters that
place the nodes (`runner.kubernetes`, `runner.slurm`). See docs/multinode.md."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sdflow.config.base import Section


class DistributedTraining(Section):
    """The `train` keys of several processes and nodes (TrainConfig inherits them)."""

    nodes: int = Field(
        1,
        ge=1,
        le=1024,
        description="machines the train stage runs on, train.processes each, started by "
        "runner.train_launcher under torchrun's c10d rendezvous (node 0 hosts it)",
    )
    sharding: Literal["none", "fsdp"] = Field(
        "none",
        description="none: every process holds the whole model (DDP); fsdp: parameters, gradients "
        "and optimizer state sharded across processes (FSDP2 fully_shard through accelerate); "
        "checkpoints are full state dicts either way",
    )
    fsdp_strategy: Literal["full", "hybrid"] = Field(
        "full",
        description="fsdp: full shards over every process; hybrid shards within a node and "
        "replicates across nodes (less traffic between machines, more memory per GPU)",
    )
    fsdp_cpu_offload: bool = Field(
        False, description="fsdp: keep sharded parameters and optimizer state in host memory"
    )
    max_restarts: int = Field(
        0,
        ge=0,
        le=100,
        description="torchrun --max-restarts: when a worker dies, its node restarts the worker "
        "group in the same launch at most that many times, from the newest checkpoint (a node "
        "lost whole fails the launch on the local launcher; the stage's retry resumes)",
    )

    @model_validator(mode="after")
    def _sharding(self) -> DistributedTraining:
        if self.sharding != "fsdp":
            return self
        mode, ema = getattr(self, "mode", "full"), getattr(self, "ema", False)
        if mode == "lora":
            raise ValueError(
                "train.sharding is 'fsdp' but train.mode is 'lora': a LoRA's trained weights and "
                "optimizer state are a few MB, so sharding them saves nothing and costs traffic "
                "at every step; use sharding 'none' (DDP) for LoRA"
            )
        if ema:
            raise ValueError(
                "train.sharding is 'fsdp' with train.ema true: the EMA copy is not sharded yet, so "
                "it would hold the whole model on every GPU; set ema false or sharding 'none'"
            )
        if getattr(self, "text_encoder", "frozen") != "frozen":
            raise ValueError(
                "train.sharding is 'fsdp' but train.text_encoder trains: only the UNet is sharded; "
                "set text_encoder 'frozen' or sharding 'none'"
            )
        if self.fsdp_strategy == "hybrid" and self.nodes == 1:
            raise ValueError(
                "train.fsdp_strategy is 'hybrid' but train.nodes is 1: hybrid replicates across "
                "nodes; use 'full' on one node"
            )
        return self


class KubernetesLauncher(Section):
    """Where `runner.train_launcher: kubernetes` runs the nodes: a JobSet of train.nodes pods."""

    namespace: str = Field("default", description="namespace of the JobSet")
    image: str = Field(..., min_length=1, description="container image with sdflow installed")
    gpus_per_node: int = Field(1, ge=0, le=16, description="nvidia.com/gpu per pod")
    cpu: str = Field("8", description="cpu request per pod")
    memory: str = Field("64Gi", description="memory request per pod")
    workdir_claim: str = Field(
        ...,
        min_length=1,
        description="PersistentVolumeClaim (ReadWriteMany) holding the workdir on every pod",
    )
    workdir_mount: str = Field("/workdir", description="where the claim is mounted in the pods")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, str]] = Field(default_factory=list)
    service_account: str | None = None
    max_nodes: int = Field(
        64, ge=1, description="the most pods this cluster can place at once (checked before launch)"
    )
    rendezvous_port: int = Field(29500, ge=1024, le=65535)
    poll_s: float = Field(10.0, gt=0, le=600, description="seconds between status polls")


class SlurmLauncher(Section):
    """Where `runner.train_launcher: slurm` runs the nodes: one sbatch job of train.nodes nodes."""

    partition: str | None = None
    account: str | None = None
    time_limit: str = Field("24:00:00", description="sbatch --time")
    gpus_per_node: int = Field(1, ge=0, le=16)
    cpus_per_task: int = Field(8, ge=1, le=1024)
    max_nodes: int = Field(
        64, ge=1, description="the most nodes the partition gives one job (checked before launch)"
    )
    rendezvous_port: int = Field(29500, ge=1024, le=65535)
    setup: list[str] = Field(
        default_factory=list, description="shell lines run before srun (module load, venv)"
    )
    poll_s: float = Field(30.0, gt=0, le=3600, description="seconds between sacct polls")


LOCAL_MAX_NODES = 8  # process groups on one host: for tests and one big box, not a cluster


def check_placement(nodes: int, launcher: str, cluster: KubernetesLauncher | SlurmLauncher | None):
    """More nodes than the launcher can place fail before any work (runner.*.max_nodes)."""
    most = LOCAL_MAX_NODES if cluster is None else cluster.max_nodes
    if nodes > most:
        where = (
            f"the local launcher runs at most {most} process groups on one host"
            if cluster is None
            else f"runner.{launcher}.max_nodes is {most}"
        )
        raise ValueError(
            f"train.nodes is {nodes} but {where}: lower train.nodes, raise max_nodes where the "
            "cluster has the machines, or use a cluster launcher (runner.train_launcher)"
        )
