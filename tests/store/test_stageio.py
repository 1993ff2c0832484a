"""The stage-output contract: complete-or-invisible directories, manifests last, resumable partials."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from sdflow.store import stageio


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


# ------------------------------------------------------------------------- fingerprint = content


def _weights_with_history(seconds: float, weights: bytes = b"\x01\x02"):
    def work(build: stageio.StageBuild) -> stageio.Manifest:
        (build.path / "vae").mkdir()
        (build.path / "vae" / "weights.bin").write_bytes(weights)
        for folder in stageio.HISTORY:  # what a resumed run writes differently
            (build.path / folder).mkdir()
            (build.path / folder / "state.json").write_text(json.dumps({"seconds": seconds}))
        return build.finish(counts={"steps": 4}, info={"seconds_training": seconds})

    return work


def test_fingerprint_covers_content_not_run_history(tmp_path):
    clean = stageio.build_stage(tmp_path, "ae", "a", _weights_with_history(10.79))
    resumed = stageio.build_stage(tmp_path, "ae", "b", _weights_with_history(32.42))
    assert resumed["fingerprint"] == clean["fingerprint"]
    assert resumed["info"] != clean["info"]  # the history is kept, in info and on disk

    changed = stageio.build_stage(tmp_path, "ae", "c", _weights_with_history(10.79, b"\x01\x03"))
    assert changed["fingerprint"] != clean["fingerprint"]


@pytest.mark.parametrize("bad", [{"images_per_second": 12.5}, {"ok": True}, {"by": {"x": 0.5}}])
def test_counts_hold_whole_numbers_only(tmp_path, bad):
    def work(build):
        return build.finish(counts={"kept": 3, "failed_by_reason": {"http_404": 1}, **bad})

    with pytest.raises(TypeError, match="move .* into info"):
        stageio.build_stage(tmp_path, "demo", "k", work)
    assert not stageio.stage_dir(tmp_path, "demo", "k").exists()


def test_debris_directories_of_an_interrupted_model_save_are_cleared(tmp_path):
    # what a kill -9 inside `atomic_dir` and `write_atomic` leaves in the partial directory
    partial = stageio.stage_dir(tmp_path, "train", "k").with_name(".k.partial")
    (partial / "pipeline").parent.mkdir(parents=True)
    (partial / ".pipeline.dead0000.tmp" / "unet").mkdir(parents=True)
    (partial / ".pipeline.dead0000.tmp" / "unet" / "w.safetensors").write_bytes(b"half")
    (partial / "sub").mkdir()
    (partial / "sub" / ".x.json.dead.tmp").write_text("{")

    def finish(build):
        (build.path / "pipeline").mkdir()
        (build.path / "pipeline" / "w").write_bytes(b"whole")
        return build.finish(counts={})

    manifest = stageio.build_stage(tmp_path, "train", "k", finish)
    out = stageio.output_dir(tmp_path, manifest)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        stageio.MANIFEST,
        "pipeline",
        "pipeline/w",
        "sub",
    ]


def test_an_unreadable_manifest_is_an_error_and_the_output_stays(tmp_path, monkeypatch):
    first = stageio.build_stage(tmp_path, "demo", "k", _build_two_shards)
    final = stageio.stage_dir(tmp_path, "demo", "k")
    real = type(final).read_bytes

    def flaky(path):
        if path.name == stageio.MANIFEST:
            raise OSError(5, "Input/output error")
        return real(path)

    monkeypatch.setattr(type(final), "read_bytes", flaky)
    with pytest.raises(stageio.ManifestUnreadable, match="Input/output error"):
        stageio.build_stage(tmp_path, "demo", "k", lambda b: pytest.fail("must not rebuild"))
    monkeypatch.undo()
    assert stageio.load_manifest(final) == {k: v for k, v in first.items() if k != "reused"}


def test_publishing_renames_are_followed_by_a_directory_fsync(tmp_path, monkeypatch):
    synced = []
    real = stageio.fsync_dir
    monkeypatch.setattr(stageio, "fsync_dir", lambda p: synced.append(Path(p)) or real(p))
    manifest = stageio.build_stage(tmp_path, "demo", "k", _build_two_shards)
    final = stageio.output_dir(tmp_path, manifest)
    partial = final.with_name(".k.partial")
    assert synced.count(partial) >= 2  # each shard published in the partial directory
    assert synced.count(partial / "failures") == 2
    assert synced[-1] == final.parent  # the stage itself, last


def test_failure_details_drop_object_addresses():
    table = stageio.failures_table(
        [
            {
                "id": "7",
                "source": "demo/7.png",
                "reason": "undecodable_image",
                "detail": "cannot identify image file <_io.BytesIO object at 0x7f119464e4d0>",
            }
        ]
    )
    assert table.column("detail").to_pylist() == ["cannot identify image file <_io.BytesIO>"]


def test_two_builders_of_one_key_build_it_once(tmp_path):
    calls, entered = [], threading.Event()

    def slow_build(build):
        calls.append(1)
        entered.set()
        time.sleep(0.3)  # the other builder arrives meanwhile and must wait for the lock
        return _build_two_shards(build)

    results = []
    first = threading.Thread(
        target=lambda: results.append(stageio.build_stage(tmp_path, "demo", "k", slow_build))
    )
    first.start()
    entered.wait(5)
    second = stageio.build_stage(tmp_path, "demo", "k", slow_build)
    first.join()
    assert len(calls) == 1
    assert second["reused"] is True and results[0]["reused"] is False
    assert second["fingerprint"] == results[0]["fingerprint"]


def test_trash_of_a_replaced_export_is_cleared_before_publishing(tmp_path):
    """A kill while `atomic_dir` deletes the export it replaced leaves `.<name>.trash-*` in the
    partial directory; the resumed build publishes the same content as a clean one."""
    clean = stageio.build_stage(tmp_path / "clean", "train", "k", _export_twice)
    partial = stageio.stage_dir(tmp_path / "killed", "train", "k").with_name(".k.partial")
    (partial / ".lora.trash-dead0000" / "deep").mkdir(parents=True)
    (partial / ".lora.trash-dead0000" / "deep" / "w.safetensors").write_bytes(b"old export")
    resumed = stageio.build_stage(tmp_path / "killed", "train", "k", _export_twice)
    out = stageio.output_dir(tmp_path / "killed", resumed)
    assert sorted(p.name for p in out.rglob("*")) == [stageio.MANIFEST, "lora", "w"]
    assert resumed["fingerprint"] == clean["fingerprint"]


def _export_twice(build: stageio.StageBuild) -> stageio.Manifest:
    for content in (b"first", b"second"):  # a resumed export replaces the previous one
        with stageio.atomic_dir(build.path / "lora") as tmp:
            (tmp / "w").write_bytes(content)
    return build.finish(counts={})


def test_atomic_dir_fsyncs_every_file_and_directory_before_the_rename(tmp_path, monkeypatch):
    synced, renames = [], []
    real_fsync, real_replace = stageio.os.fsync, stageio.os.replace

    def fsync(fd):
        synced.append((Path(stageio.os.readlink(f"/proc/self/fd/{fd}")).name, len(renames)))
        real_fsync(fd)

    monkeypatch.setattr(stageio.os, "fsync", fsync)
    monkeypatch.setattr(stageio.os, "replace", lambda a, b: renames.append(b) or real_replace(a, b))
    with stageio.atomic_dir(tmp_path / "model") as tmp:
        (tmp / "unet").mkdir()
        (tmp / "unet" / "w.safetensors").write_bytes(b"weights")
        (tmp / "model_index.json").write_text("{}")
    monkeypatch.undo()
    published = [p.name for p in (tmp_path / "model").rglob("*")]
    before_rename = {name for name, renamed in synced if renamed == 0}
    assert set(published) <= before_rename  # each file and folder, by name, before the rename
    assert any(name.endswith(".tmp") for name in before_rename)  # the directory renamed itself
    assert (tmp_path.name, 1) in synced  # and its parent after the rename
