"""The `runner` section: task runner, workers, Dask, GPU slots."""

from __future__ import annotations

import ipaddress
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, model_validator

from sdflow.config.base import Section
from sdflow.config.distributed import KubernetesLauncher, SlurmLauncher


class RunnerConfig(Section):
    """How Prefect runs the stages."""

    task_runner: Literal["threads", "processes", "dask"] = Field(
        "threads",
        description="where the data stages' shard tasks run: threads of the stage's process, "
        "max_workers worker processes of this host (for CPU-bound shards, e.g. long URL lists: "
        "one interpreter lock each), or the Dask cluster at dask_address (pip install -e '.[dask]')",
    )
    max_workers: int = Field(
        4,
        ge=1,
        le=256,
        description="threads or processes of this host; shards in flight at a time (all runners)",
    )
    dask_address: str | None = Field(
        None,
        description="Dask scheduler address (task_runner: dask): tls://HOST:8786, or tcp:// on "
        "loopback (tcp://127.0.0.1:8786); other addresses need allow_insecure_dask",
    )
    allow_insecure_dask: bool = Field(
        False,
        description="allow a dask_address that is neither tls:// nor loopback: anyone who reaches "
        "an unencrypted scheduler can run code on its workers",
    )
    result_storage: str | None = Field(None, description="Prefect result storage; default workdir")
    train_launcher: Literal["local", "kubernetes", "slurm"] = Field(
        "local",
        description="where the train stage's torchrun nodes run: local (this host; train.nodes > 1 "
        "are process groups over loopback), kubernetes (a JobSet, runner.kubernetes) or slurm "
        "(an sbatch job, runner.slurm)",
    )
    rendezvous_port: int | None = Field(
        None,
        ge=1024,
        le=65535,
        description="local launcher: the c10d rendezvous port on 127.0.0.1; unset: a free one",
    )
    kubernetes: KubernetesLauncher | None = None
    slurm: SlurmLauncher | None = None

    @model_validator(mode="after")
    def _launcher_settings(self) -> RunnerConfig:
        launcher = self.train_launcher
        if launcher != "local" and getattr(self, launcher) is None:
            raise ValueError(
                f"runner.train_launcher is {launcher!r} but runner.{launcher} is not set: it says "
                "where the nodes run (see docs/multinode.md)"
            )
        return self

    @model_validator(mode="after")
    def _dask_is_private(self) -> RunnerConfig:
        address = self.dask_address
        if address and not self.allow_insecure_dask and not _private_dask(address):
            raise ValueError(
                f"runner.dask_address = {address!r} is neither tls:// nor a loopback address, so "
                "anyone on the network could read the data and run code on the workers. Allowed: "
                "tls://HOST:PORT, or tcp://127.0.0.1:PORT, tcp://localhost:PORT, tcp://[::1]:PORT; "
                "or set runner.allow_insecure_dask: true on a network you trust."
            )
        return self


def _private_dask(address: str) -> bool:
    """A TLS scheduler address, or any scheme on this machine's loopback interface."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")  # Dask's default
    if parts.scheme == "tls":
        return True
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
