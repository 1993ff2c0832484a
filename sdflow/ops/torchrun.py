"""The one torchrun command line of every launcher, and the local launcher's nodes on this host.

`torchrun_command` is what each node runs, on this host (`local`), in each pod of a JobSet
(`kubernetes`) and under `srun` (`slurm`): torch.distributed's elastic launcher with the c10d
rendezvous, `--nnodes N --nproc-per-node P`, the run id and `--max-restarts`. Only the rendezvous
endpoint differs between launchers, so it is not on the line: torchrun reads every option from a
`PET_<OPTION>` variable too, and each launcher sets `PET_RDZV_ENDPOINT` (node 0's address) in the
node's environment. The worker's spec path is relative: every node runs in the shared workdir.

Node ranks come from the rendezvous (the `GROUP_RANK` a worker sees); the host named by the
endpoint serves the rendezvous store (torchrun's c10d backend: a node whose address matches
hosts it, the others connect). With `local`, every node is 127.0.0.1: the first to bind the port
hosts it and the others connect.

Every launcher also sets `AGENT_ENV` in the agents' environment, for elastic restarts
(`--max-restarts`). By default torchrun's c10d rendezvous hands its workers one TCP store, served
by the first round's rank-0 agent and kept for every later round (torch's `DynamicRendezvousHandler`
caches its `_bootstrap_store_info`), and the workers use it without a per-round prefix (torch's
`_create_c10d_store`: "We create a new TCPStore for every retry"). After a restart the new workers
then find the previous round's keys still there: gloo (or NCCL) reads a dead worker's address,
fails with "connectFullMesh failed ... Connection refused", and that burns another restart (or the
job). `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` gives every round a fresh store: the rank-0 agent
picks a free port and its worker of rank 0 serves it (docs/multinode.md, "Elastic restarts").

A workdir that is not shared between nodes fails before training: each node's first worker
writes a marker in the launch directory, and a node that cannot see node 0's marker (or the spec
the stage wrote) within `SHARED_TIMEOUT_S` stops with that reason (`check_shared_workdir`).
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sdflow.errors import UserError

ENDPOINT_ENV = "PET_RDZV_ENDPOINT"  # torchrun's --rdzv-endpoint, from the environment
NODE_ENV = "SDFLOW_NODE"  # the launcher's index of a node (its pod index, its Slurm node id)
SHARED_TIMEOUT_S = 60.0  # a shared filesystem may show another host's file a little late
AGENT_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # a fresh store every round: module doc
USER_ERROR_PREFIX = "sdflow user error: "  # a worker's line the supervisor turns into a UserError


def torchrun_command(
    nodes: int,
    processes: int,
    run_id: str,
    max_restarts: int,
    module: str,
    args: Sequence[str],
    python: str = sys.executable,
) -> list[str]:
    """`python -m torch.distributed.run ... -m module args`: one node's command, every launcher's."""
    return [
        python, "-m", "torch.distributed.run",
        "--nnodes", str(nodes), "--nproc-per-node", str(processes),
        "--rdzv-backend", "c10d", "--rdzv-id", run_id,
        "--max-restarts", str(max_restarts), "--monitor-interval", "1",
        "-m", module, *args,
    ]  # fmt: skip


def loopback_port(configured: int | None) -> int:
    """The local rendezvous port: `runner.rendezvous_port` if it is free, else a free one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", configured or 0))
        except OSError as exc:
            what = (
                f"runner.rendezvous_port {configured} is in use on 127.0.0.1"
                if configured
                else "no free TCP port on 127.0.0.1"
            )
            raise UserError(
                f"{what} ({exc.strerror}): the local launcher's nodes meet there (torchrun's c10d "
                "rendezvous). Set runner.rendezvous_port to a free port, or stop what holds it."
            ) from None
        return probe.getsockname()[1]


def local_node_envs(nodes: int, port: int, env: dict[str, str]) -> list[dict[str, str]]:
    """Each local node's environment: the loopback endpoint and the node's index."""
    endpoint = {ENDPOINT_ENV: f"127.0.0.1:{port}"}
    return [{**env, **AGENT_ENV, **endpoint, NODE_ENV: str(i)} for i in range(nodes)]


def check_shared_workdir(
    launch_dir: Path, spec: Path, node: int, timeout_s: float = SHARED_TIMEOUT_S
) -> None:
    """Write this node's marker; a node that cannot see the spec or node 0's marker stops."""
    markers = launch_dir / "nodes"
    if not _appears(spec.is_file, timeout_s):
        raise UserError(_not_shared(node, spec, "the spec the train stage wrote"))
    markers.mkdir(parents=True, exist_ok=True)
    (markers / f"node-{node}").write_text(socket.gethostname())
    if node and not _appears((markers / "node-0").is_file, timeout_s):
        raise UserError(_not_shared(node, markers / "node-0", "node 0's marker"))


def _appears(check: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _not_shared(node: int, path: Path, what: str) -> str:
    return (
        f"node {node} ({socket.gethostname()}) cannot see {what} at {path}: the workdir is not "
        "shared between the nodes, and checkpoints written by rank 0 would be invisible to the "
        "others. Mount the same ReadWriteMany volume (runner.kubernetes.workdir_claim) or shared "
        "filesystem at the workdir on every node."
    )
