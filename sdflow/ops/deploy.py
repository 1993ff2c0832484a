"""`sdflow deploy`: register sdflow's deployments with a Prefect server.

    sdflow deploy [--pool sdflow] [--pool-type process|kubernetes] [--workdir DIR] [--gpus N]
                  [--code-dir DIR] [--pause-schedules]

Creates what the deployments need, then registers `deployments/prefect.yaml` with `prefect deploy`:
- the work pool: `process` (one machine; start a worker with `prefect worker start --pool sdflow`) or
  `kubernetes` with `deployments/k8s-job-template.json` (GPU request, shared work volume);
- the `gpu` tag concurrency limit (limit = GPUs on this host, or --gpus), which the autoencoder,
  latents, train and evaluate tasks hold, and one global concurrency limit per device, `gpu-0` …
  `gpu-<N-1>` (one slot each), which binds each holder to its own GPU (`sdflow.ops.gpuslots`).
An existing pool is left as it is (its template may have been edited in the UI); the limits are set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sdflow.errors import UserError

ROOT = Path(__file__).resolve().parents[2]  # the repository: sdflow/ops/deploy.py
PREFECT_FILE = ROOT / "deployments" / "prefect.yaml"
K8S_TEMPLATE = ROOT / "deployments" / "k8s-job-template.json"
K8S_CODE_DIR = "/opt/sdflow"  # where the image keeps the checkout (see the job template)
K8S_WORKDIR = "/data/sdflow-work"  # on the shared work volume
GPU_TAG = (
    "gpu"  # the tag sdflow.ops.orchestration puts on GPU stages (not imported: it pulls in Prefect)
)


@dataclass
class DeployPlan:
    pool: str
    pool_type: str  # "process" or "kubernetes"
    workdir: str  # where flow runs keep stage outputs (on the worker)
    code_dir: str  # the sdflow checkout on the worker
    gpus: int
    pause_schedules: bool = False


def plan_deploy(
    pool: str,
    pool_type: str,
    workdir: str | None,
    code_dir: str | None,
    gpus: int | None,
    pause_schedules: bool = False,
) -> DeployPlan:
    """Fill in the defaults: this checkout and ./sdflow-work locally, the image's paths on k8s."""
    local = pool_type == "process"
    if workdir is None:
        workdir = str(Path("sdflow-work").resolve()) if local else K8S_WORKDIR
    elif local:
        workdir = str(Path(workdir).resolve())
    code_dir = code_dir or (str(ROOT) if local else K8S_CODE_DIR)
    return DeployPlan(pool, pool_type, workdir, code_dir, gpus or host_gpus(), pause_schedules)


def deploy(plan: DeployPlan) -> list[str]:
    """Create the pool and the gpu limit, register every deployment; returns their names."""
    api_url = require_server()
    ensure_work_pool(plan.pool, plan.pool_type)
    set_gpu_limit(plan.gpus)
    register(plan, api_url)
    names = deployment_names(plan.pool)
    if plan.pause_schedules:
        pause_schedules(plan.pool)
    return names


def require_server() -> str:
    """Deployments only make sense on a server that outlives this command: it must be up."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise UserError(
            "sdflow deploy needs a running Prefect server: start one with `sdflow server` and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api (or select a Prefect profile that "
            "sets it), then deploy again."
        )
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as exc:
        raise UserError(
            f"No Prefect server answers at PREFECT_API_URL={url} ({exc}). Start it with "
            "`sdflow server` (or fix the URL), then deploy again."
        ) from None
    return url


def ensure_work_pool(name: str, pool_type: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            template = base_job_template(pool_type)
            create = WorkPoolCreate(name=name, type=pool_type, base_job_template=template)
            client.create_work_pool(create)
            print(f"created work pool {name!r} ({pool_type})")
            return
    if pool.type != pool_type:
        raise UserError(
            f"Work pool {name!r} exists with type {pool.type!r}, not {pool_type!r}. "
            "Choose another name with --pool, or delete it with `prefect work-pool delete`."
        )
    print(f"work pool {name!r} ({pool_type}) exists; left as it is")


def base_job_template(pool_type: str) -> dict:
    if pool_type == "kubernetes":
        return json.loads(K8S_TEMPLATE.read_text())
    from prefect.workers.process import ProcessWorker

    return ProcessWorker.get_default_base_job_template()


def set_gpu_limit(gpus: int) -> None:
    """The `gpu` tag limit and the device limits gpu-0 … gpu-<gpus-1>; other device limits go."""
    from prefect.client.orchestration import get_client

    from sdflow.ops.gpuslots import device_limit_name, device_limits

    wanted = [device_limit_name(i) for i in range(gpus)]
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=gpus)  # an upsert
        for name in wanted:
            client.upsert_global_concurrency_limit_by_name(name, limit=1)
        for name in set(device_limits()) - set(wanted):  # from an earlier deploy with more GPUs
            client.delete_global_concurrency_limit_by_name(name)
    print(f"concurrency limit {GPU_TAG!r}: {gpus} slot(s), one per device: {', '.join(wanted)}")


def host_gpus() -> int:
    """GPUs on this host; at least 1, so CPU hosts still run one heavy stage at a time."""
    import torch

    return max(1, torch.cuda.device_count())


def register(plan: DeployPlan, api_url: str) -> None:
    """`prefect deploy --all` on deployments/prefect.yaml, its $SDFLOW_* values from the plan."""
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "SDFLOW_POOL": plan.pool,
        "SDFLOW_WORKDIR": plan.workdir,
        "SDFLOW_ROOT": plan.code_dir,
    }
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
    command += ["--prefect-file", str(PREFECT_FILE)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"prefect deploy failed:\n{result.stdout}\n{result.stderr}")


def deployment_names(pool: str) -> list[str]:
    """`flow/deployment` of each deployment on the pool, with its schedules."""
    from prefect.client.orchestration import get_client

    names = []
    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        for d in client.read_deployments(work_pool_filter=_pool_filter(pool)):
            schedules = ", ".join(
                s.schedule.cron for s in d.schedules if hasattr(s.schedule, "cron")
            )
            names.append(f"{flows[d.flow_id]}/{d.name}" + (f"  [{schedules}]" if schedules else ""))
    return sorted(names)


def _pool_filter(pool: str):
    from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName

    return WorkPoolFilter(name=WorkPoolFilterName(any_=[pool]))


def pause_schedules(pool: str) -> None:
    """Deactivate the example schedules (a test server, or a host that should only run on demand)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for d in client.read_deployments(work_pool_filter=_pool_filter(pool)):
            for schedule in d.schedules:
                client.update_deployment_schedule(d.id, schedule.id, active=False)
