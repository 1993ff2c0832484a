"""Everything sdflow asks of Prefect, in one place: the stage cache policy, retries, the task wrapper,
GPU slots and where results are stored (UI artifacts live beside it, in `sdflow.ops.artifacts`).

The stage directory is the source of truth; Prefect's cache mirrors it. A cached record is only used
while the stage directory it points to is complete and holds the same content: the record's key
carries the stage key and the fingerprint of the MANIFEST.json on disk, so a deleted or rebuilt
output never comes back as an old record. Records are JSON, never pickles: whoever can write the
results directory or bucket cannot make a worker run code.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.context import FlowRunContext, TaskRunContext
from prefect.results import get_result_store
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from sdflow.config import RunConfig, RunnerConfig
from sdflow.errors import UserError, as_user_error
from sdflow.ops.artifacts import stage_progress
from sdflow.ops.gpuslots import gpu_slot
from sdflow.ops.results import PLAIN_JSON
from sdflow.store.shardmap import ShardJob, ShardMapper, in_order, windowed
from sdflow.store.stageio import Manifest, load_manifest, stage_dir

# These stages hold a slot of the `gpu` tag concurrency limit that `sdflow deploy` creates (limit =
# GPUs on the host), and inside it one device's limit `gpu-<i>` that binds them to that GPU
# (`sdflow.ops.gpuslots`); caption holds a device slot too when a captioning model runs. Without the
# limits (plain `sdflow run`) neither does anything.
GPU_TAG = "gpu"
GPU_STAGES = frozenset({"autoencoder", "class_images", "latents", "train", "evaluate"})
# Prefect storage blocks that `runner.result_storage: <type>/<name>` may name (object storage).
STORAGE_BLOCK_TYPES = (
    "s3-bucket",
    "gcs-bucket",
    "azure-blob-storage-container",
    "remote-file-system",
)
RESULTS_DIR = "prefect-results"

Upstream = dict[str, Manifest | None]
KeyFn = Callable[[RunConfig, Upstream], str]
StageFn = Callable[[RunConfig, Upstream, str], Manifest]


@dataclass
class StageCache(CachePolicy):
    """Cache key = the stage key (content fingerprints), valid only while the output exists."""

    stage: str = ""
    key_fn: KeyFn | None = field(default=None, repr=False)

    def compute_key(
        self, task_ctx, inputs: dict[str, Any], flow_parameters, **kwargs
    ) -> str | None:
        key = self.key_fn(inputs["config"], inputs["upstream"])
        manifest = load_manifest(stage_dir(inputs["workdir"], self.stage, key))
        if manifest is None:
            return None  # nothing on disk: run the stage (it resumes from its partial directory)
        return cache_key(self.stage, key, manifest["fingerprint"])


def retry_unless_user_error(task: Task, task_run: Any, state: Any) -> bool:
    """Transient failures (network, I/O, a killed worker) are retried; user errors are not (the
    task body turned out-of-memory, disk-full and permission errors into user errors)."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return True


def stage_task(
    stage: str, key_fn: KeyFn, retries: int = 2, **options: Any
) -> Callable[[StageFn], Task]:
    """Turn a plain stage function `fn(config, upstream, workdir) -> Manifest` into a Prefect task."""

    settings: dict[str, Any] = {
        "name": stage,
        "tags": [GPU_TAG] if stage in GPU_STAGES else [],
        "cache_policy": StageCache(stage=stage, key_fn=key_fn),
        "persist_result": True,
        "result_serializer": PLAIN_JSON,  # plain JSON, no class imports (sdflow.ops.results)
        "retries": retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=2),
        "retry_jitter_factor": 0.5,
        "retry_condition_fn": retry_unless_user_error,
        **options,
    }

    def wrap(fn: StageFn) -> Task:
        return task(as_stage_run(stage, key_fn, fn), **settings)

    return wrap


def as_stage_run(stage: str, key_fn: KeyFn, fn: StageFn) -> StageFn:
    """`fn` as a task body: shows its progress in the UI and records a fresh output in the cache.

    StageCache has no key while the output is missing (so a deleted output is rebuilt, never a stale
    hit), and Prefect persists a keyless result where no lookup finds it. Writing the record under the
    stage key once the output exists is what makes the next run, and a retry of this flow run after
    a later stage failed, come back Cached.
    """

    @functools.wraps(fn)  # keeps the signature: the cache policy and Prefect bind the arguments
    def run(config: RunConfig, upstream: Upstream, workdir: str) -> Manifest:
        if TaskRunContext.get() is None:  # `task.fn(...)` in tests: no run, no artifacts
            return fn(config, upstream, workdir)
        key = key_fn(config, upstream)
        fresh = load_manifest(stage_dir(workdir, stage, key)) is None
        try:
            with stage_progress(stage), stage_gpu_slot(stage, config):
                manifest = fn(config, upstream, workdir)
        except Exception as exc:
            deterministic = as_user_error(exc, stage)
            if deterministic is None or deterministic is exc:
                raise
            raise deterministic from exc
        if fresh and "fingerprint" in manifest:
            get_result_store().write(manifest, key=cache_key(stage, key, manifest["fingerprint"]))
        return manifest

    return run


def stage_gpu_slot(stage: str, config: RunConfig) -> AbstractContextManager:
    """A device slot for the GPU stages, and for caption when its backend runs a model."""
    if stage in GPU_STAGES or (stage == "caption" and config.caption.backend != "keep"):
        return gpu_slot()
    return nullcontext()


def cache_key(stage: str, key: str, fingerprint: str) -> str:
    """A record per stage key and content: a rebuilt output with other content misses it."""
    return f"sdflow-{stage}-{key}-{fingerprint[:16]}"


def result_storage(setting: str | None, workdir: str | Path) -> Path | str:
    """Where the stages' cache records go: `runner.result_storage`, by default `WORKDIR/prefect-results`.

    Next to the stage outputs by default, so a retry on another worker that shares the workdir finds
    them. `s3-bucket/sdflow-results` (a storage block's type/name) is object storage for workers that
    share no disk for results; any other value is a path, relative to the workdir.
    """
    if not setting:
        return Path(workdir).resolve() / RESULTS_DIR
    block_type, _, name = setting.partition("/")
    if block_type in STORAGE_BLOCK_TYPES and re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        return setting
    return (Path(workdir) / Path(setting).expanduser()).resolve()


# ------------------------------------------------------------------------------------ shard tasks


def mapped_shards(fn: Callable[..., Manifest]) -> StageFn:
    """A stage function `fn(config, upstream, workdir, mapper)` whose shard jobs become Prefect tasks.

    The stage stays plain Python (a direct call maps its shards in order, in-process); this is what
    its `@task` runs, so in a flow run each shard is a task on the runner `config.runner` selects.
    """

    def run(config: RunConfig, upstream: Upstream, workdir: str) -> Manifest:
        return fn(config, upstream, workdir, mapper=shard_mapper(config.runner))

    run.__name__, run.__qualname__ = fn.__name__, fn.__qualname__
    run.__module__, run.__doc__ = fn.__module__, fn.__doc__
    return run


def shard_mapper(runner: RunnerConfig) -> ShardMapper:
    """Shard jobs as tasks of this flow run on `task_runner(runner)`; outside a flow, in order."""
    if FlowRunContext.get() is None:
        return in_order

    def mapper(fn: Callable[[ShardJob], Any], jobs) -> Any:
        shard = _shard_task(fn)
        # worker processes report to this run's API; entered in the stage task: shard runs are
        # its children
        api = shared_api() if runner.task_runner == "processes" else nullcontext()
        with api, task_runner(runner) as pool:
            submit = functools.partial(_submit, pool, shard)
            yield from windowed(submit, jobs, window=2 * runner.max_workers)

    return mapper


def task_runner(runner: RunnerConfig) -> TaskRunner:
    """A pool of `runner.max_workers` threads or processes, or the Dask cluster at
    `runner.dask_address`.

    Made per stage from the profile rather than taken from the flow, so a deployment, a retry and
    `sdflow run` all use the profile's choice without rebuilding the flow.
    """
    if runner.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise UserError(
                "runner.task_runner is 'dask' but prefect-dask is not installed: "
                "pip install -e '.[dask]'."
            ) from None
        return DaskTaskRunner(address=runner.dask_address)
    if runner.task_runner == "processes":
        return ProcessPoolTaskRunner(max_workers=runner.max_workers)
    return ThreadPoolTaskRunner(max_workers=runner.max_workers)


@contextmanager
def shared_api() -> Iterator[None]:
    """Worker processes report to this process's Prefect API, also to the ephemeral one a plain
    `sdflow run` starts (which each of them would otherwise start anew, and keep its runs to
    itself)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one this process started
    if not server.running:
        yield
        return
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


@functools.cache
def _shard_task(fn: Callable[[ShardJob], Any]) -> Task:
    """One task per job function. No cache or retries of its own: a failed shard fails the stage
    task, whose retry skips the shards already written."""
    return task(
        fn,
        task_run_name="{job.build.stage}-shard-{job.index}",
        cache_policy=NO_CACHE,
        persist_result=False,
        retries=0,
    )


def _submit(pool: TaskRunner, shard: Task, job: ShardJob) -> Any:
    return pool.submit(shard, {"job": job})
