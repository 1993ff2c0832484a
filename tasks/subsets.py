"""Subsets stage: the captioned subsets (`subsets` in the profile) joined into one training set.

    sdflow run PROFILE --only subsets

Each subset's download, filter and caption stages ran on their own key (`download[NAME]`, ...), so
editing one subset rebuilds only its stages. This stage copies their caption shards, in the order the
profile lists the subsets, into one set whose ids are `NAME/ID`: the latents, train and evaluate
stages read it as they read the caption stage's output, and the train stage finds each sample's
subset in its id (`sdflow.training.subsets`). Its key holds the names and the caption outputs'
fingerprints, not repeats or weights (they shape the training order only, and are in the train
stage's key); the latents stage reuses the rows of unchanged subsets from its row memo.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from sdflow.config import RunConfig
from sdflow.ops.orchestration import stage_task
from sdflow.store.fingerprint import code_version
from sdflow.store.stageio import Manifest, StageBuild, build_stage, shard_paths, stage_key

STAGE = "subsets"
SEPARATOR = "/"  # between the subset's name and the sample's own id


def upstream_name(subset: str) -> str:
    """The upstream key (and summary entry) of one subset's caption stage."""
    return f"caption[{subset}]"


def subsets_key(config: RunConfig, upstream: dict[str, Manifest | None]) -> str:
    names = [s.name for s in config.subsets or []]
    inputs = [upstream.get(upstream_name(name)) for name in names]
    return stage_key(STAGE, {"names": names}, inputs, code_version(__name__))


def join_subsets(config: RunConfig, upstream: dict[str, Manifest | None], workdir: str) -> Manifest:
    """Build (or reuse) the joined caption shards of every subset."""
    key = subsets_key(config, upstream)
    return build_stage(workdir, STAGE, key, lambda b: _build(b, config, upstream, workdir))


join_subsets_task = stage_task(STAGE, subsets_key)(join_subsets)


def _build(
    build: StageBuild, config: RunConfig, upstream: dict[str, Manifest | None], workdir: str
) -> Manifest:
    shards: list[str] = []
    images: dict[str, int] = {}
    for subset in config.subsets or []:
        images[subset.name] = 0
        for path in shard_paths(workdir, upstream[upstream_name(subset.name)]):
            table = prefixed(pq.read_table(path), subset.name)
            shards.append(build.write_shard(len(shards), table))
            images[subset.name] += table.num_rows
    return build.finish(
        counts={"kept": sum(images.values()), "by_subset": images},
        shards=shards,
        info={"subsets": list(images)},
    )


def prefixed(table: pa.Table, name: str) -> pa.Table:
    """`table` with every id written `NAME/ID`: unique across subsets, and naming its subset."""
    ids = [f"{name}{SEPARATOR}{i}" for i in table.column("id").to_pylist()]
    return table.set_column(table.schema.get_field_index("id"), "id", pa.array(ids, pa.string()))
