"""Everything sdflow asks of Prefect, in one place: the stage cache policy, retries, the task wrapper.

The stage directory is the source of truth; Prefect's cache mirrors it. A cached record is only used
while the stage directory it points to is still complete, so deleting an output reruns that stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prefect import Task, task
from prefect.cache_policies import CachePolicy
from prefect.tasks import exponential_backoff

from sdflow.config import RunConfig
from sdflow.errors import UserError
from sdflow.stageio import Manifest, load_manifest, stage_dir

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
        if load_manifest(stage_dir(inputs["workdir"], self.stage, key)) is None:
            return None  # nothing on disk: run the stage (it resumes from its partial directory)
        return f"sdflow-{self.stage}-{key}"


def retry_unless_user_error(task: Task, task_run: Any, state: Any) -> bool:
    """Transient failures (network, I/O, a killed worker) are retried; user errors are not."""
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
        "cache_policy": StageCache(stage=stage, key_fn=key_fn),
        "persist_result": True,
        "retries": retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=2),
        "retry_jitter_factor": 0.5,
        "retry_condition_fn": retry_unless_user_error,
        **options,
    }

    def wrap(fn: StageFn) -> Task:
        return task(fn, **settings)

    return wrap
