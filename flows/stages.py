"""One flow per stage: run just that stage, upstream outputs from the cache.

These back the per-stage deployments (`sdflow-train/manual`, ...) and do what
`sdflow run PROFILE --only train` does: the upstream stages are looked up on disk (by their keys), the
stage runs (or comes back Cached), and the stages after it are left alone. `refresh=True` throws the
stage's output away first and rebuilds it. Each flow takes the pipeline's parameters (profile,
overrides, workdir), so a deployment of it is the pipeline's deployment cut down to one stage.
"""

from __future__ import annotations

from prefect import Flow, flow

from flows.pipeline import pipeline
from sdflow.config import STAGES
from sdflow.ops.results import PLAIN_JSON


def stage_flow(stage: str) -> Flow:
    """The flow `sdflow-<stage>`: the pipeline's DAG with only `stage` executed."""

    @flow(
        name=f"sdflow-{stage}",
        description=f"Run the {stage} stage alone; earlier stages come from the cache.",
        persist_result=True,
        result_serializer=PLAIN_JSON,
        log_prints=True,
    )
    def run_stage(
        profile: str = "tiny-cpu",
        overrides: list[str] | None = None,
        workdir: str = "./sdflow-work",
        refresh: bool = False,
    ) -> str:
        # pipeline.fn: the same DAG and bookkeeping, its task runs belong to this flow run
        return pipeline.fn(profile, overrides, workdir, [stage], [stage] if refresh else None)

    return run_stage


download_flow = stage_flow("download")
filter_flow = stage_flow("filter")
caption_flow = stage_flow("caption")
autoencoder_flow = stage_flow("autoencoder")
class_images_flow = stage_flow("class_images")
latents_flow = stage_flow("latents")
train_flow = stage_flow("train")
evaluate_flow = stage_flow("evaluate")

STAGE_FLOWS: dict[str, Flow] = {stage: globals()[f"{stage}_flow"] for stage in STAGES}
