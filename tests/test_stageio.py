"""The stage-output contract: complete-or-invisible directories, manifests last, resumable partials."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from sdflow import stageio


def _table(n: int) -> pa.Table:
    return pa.table({"id": [f"{i:04d}" for i in range(n)], "value": list(range(n))})


def _build_two_shards(build: stageio.StageBuild) -> stageio.Manifest:
    names = [build.write_shard(i, _table(3)) for i in range(2)]
    return build.finish(counts={"kept": 6}, shards=names, files={"failures": "failures"})


def test_build_writes_manifest_last_and_reuses(tmp_path):
    manifest = stageio.build_stage(tmp_path, "demo", "k1", _build_two_shards)
    final = stageio.stage_dir(tmp_path, "demo", "k1")
    assert manifest["reused"] is False
    on_disk = json.loads((final / stageio.MANIFEST).read_text())
    assert on_disk["fingerprint"] == manifest["fingerprint"]
    assert on_disk["counts"] == {"kept": 6}
    assert not final.with_name(".k1.partial").exists()
    assert sum(t.num_rows for t in stageio.read_shards(tmp_path, manifest)) == 6

    again = stageio.build_stage(tmp_path, "demo", "k1", lambda b: pytest.fail("must not rebuild"))
    assert again["reused"] is True
    assert again["fingerprint"] == manifest["fingerprint"]


def test_a_crash_leaves_no_visible_output_and_keeps_finished_shards(tmp_path):
    def crash_after_first_shard(build):
        build.write_shard(0, _table(3))
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        stageio.build_stage(tmp_path, "demo", "k2", crash_after_first_shard)
    final = stageio.stage_dir(tmp_path, "demo", "k2")
    assert not final.exists()
    partial = final.with_name(".k2.partial")
    first = partial / stageio.shard_name(0)
    inode = first.stat().st_ino

    def resume(build):
        assert build.has(stageio.shard_name(0))
        names = [stageio.shard_name(0), build.write_shard(1, _table(3))]
        return build.finish(counts={"kept": 6}, shards=names)

    manifest = stageio.build_stage(tmp_path, "demo", "k2", resume)
    assert (final / stageio.shard_name(0)).stat().st_ino == inode  # kept, not rewritten
    assert manifest["counts"]["kept"] == 6


def test_fingerprint_follows_content_not_key(tmp_path):
    a = stageio.build_stage(tmp_path, "demo", "a", _build_two_shards)
    b = stageio.build_stage(tmp_path, "demo", "b", _build_two_shards)
    assert a["fingerprint"] == b["fingerprint"]

    def different(build):
        return build.finish(counts={}, shards=[build.write_shard(0, _table(4))])

    c = stageio.build_stage(tmp_path, "demo", "c", different)
    assert c["fingerprint"] != a["fingerprint"]


def test_stage_key_changes_with_config_upstream_and_code():
    base = stageio.stage_key("filter", {"min_size": 1}, [{"fingerprint": "x"}], "v1")
    assert base == stageio.stage_key("filter", {"min_size": 1}, [{"fingerprint": "x"}], "v1")
    assert base != stageio.stage_key("filter", {"min_size": 2}, [{"fingerprint": "x"}], "v1")
    assert base != stageio.stage_key("filter", {"min_size": 1}, [{"fingerprint": "y"}], "v1")
    assert base != stageio.stage_key("filter", {"min_size": 1}, [{"fingerprint": "x"}], "v2")
    assert base != stageio.stage_key("caption", {"min_size": 1}, [{"fingerprint": "x"}], "v1")


def test_discard_and_unreadable_manifest(tmp_path):
    stageio.build_stage(tmp_path, "demo", "k", _build_two_shards)
    final = stageio.stage_dir(tmp_path, "demo", "k")
    (final / stageio.MANIFEST).write_text("{not json")
    assert stageio.load_manifest(final) is None
    stageio.discard_stage(tmp_path, "demo", "k")
    assert not final.exists()


def test_failures_round_trip(tmp_path):
    def with_failures(build):
        failed = stageio.failures_table(
            [{"id": "7", "source": "http://x/7", "reason": "http_404", "detail": "Not Found"}]
        )
        name = build.write_shard(0, _table(2), failed)
        return build.finish(counts={}, shards=[name], files={"failures": "failures"})

    manifest = stageio.build_stage(tmp_path, "demo", "f", with_failures)
    failures = stageio.read_failures(tmp_path, manifest)
    assert failures.to_pylist() == [
        {"id": "7", "source": "http://x/7", "reason": "http_404", "detail": "Not Found"}
    ]


def test_write_atomic_leaves_no_temp_files(tmp_path):
    target = tmp_path / "x.json"
    stageio.write_json(target, {"a": 1})
    stageio.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
