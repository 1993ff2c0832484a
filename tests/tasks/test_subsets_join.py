"""The subsets stage (tasks/subsets.py): the subsets' caption shards joined in profile order, ids made
`NAME/ID`, every other column as it was; its key ignores repeats and weights."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from fixtures.stages import caption_stage, samples

from sdflow.profiles import load_profile
from sdflow.store.stageio import read_shards
from tasks.subsets import join_subsets, subsets_key


@pytest.fixture()
def config_of(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()

    def config(repeats: int):
        items = [
            f"{{name: a, source: {{path: {tmp_path / 'a'}}}, repeats: {repeats}}}",
            f"{{name: b, source: {{path: {tmp_path / 'b'}}}}}",
        ]
        return load_profile("tiny-test", ["source=null", f"subsets=[{', '.join(items)}]"])

    return config


def test_join_prefixes_ids_and_keeps_rows_in_profile_order(tmp_path, config_of):
    workdir = tmp_path / "work"
    first, second = samples(24), samples(12)  # the same ids s000 ... in both subsets
    upstream = {
        "caption[a]": caption_stage(workdir, first),
        "caption[b]": caption_stage(workdir, second),
    }
    joined = join_subsets(config_of(1), upstream, str(workdir))
    rows = [row for table in read_shards(workdir, joined) for row in table.to_pylist()]
    expected = [{**r, "id": f"a/{r['id']}"} for r in first]
    expected += [{**r, "id": f"b/{r['id']}"} for r in second]
    assert rows == expected
    assert joined["counts"] == {"kept": 36, "by_subset": {"a": 24, "b": 12}}
    shard = workdir / joined["path"] / joined["shards"][0]
    assert pq.read_schema(shard).names == list(first[0])

    assert subsets_key(config_of(5), upstream) == subsets_key(config_of(1), upstream)
    other = {**upstream, "caption[b]": caption_stage(workdir, samples(6))}
    assert subsets_key(config_of(1), other) != subsets_key(config_of(1), upstream)
