"""`sdflow gc`: frees exactly what no kept run or sweep needs, never what a running build holds."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import humanize
import pyarrow as pa
import pytest
import torch

from sdflow.cli import main
from sdflow.store import gc as gc_module
from sdflow.store import stageio
from sdflow.store.checkpoints import list_checkpoints, load_latest, save_checkpoint
from sdflow.store.fingerprint import hash_tree
from sdflow.store.gc import collect_garbage


def _output(workdir: Path, stage: str, key: str, steps: tuple[int, ...] = ()) -> Path:
    """A finished stage output built through the real stage contract (shard + checkpoints)."""

    def work(build: stageio.StageBuild) -> stageio.Manifest:
        table = pa.table({"id": [f"{key}-{i}" for i in range(50)], "v": list(range(50))})
        shard = build.write_shard(0, table)
        for step in steps:
            state = {"model": {"w": torch.full((256,), float(step))}}
            save_checkpoint(build.path / "checkpoints", step, state, keep=10)
        files = {"checkpoints": "checkpoints"} if steps else {}
        return build.finish(counts={"kept": 50}, shards=[shard], files=files)

    return stageio.output_dir(workdir, stageio.build_stage(workdir, stage, key, work))


def _summary(path: Path, started: str, outputs: dict[str, Path]) -> None:
    """A summary.json shaped like flows/tracking.py writes it."""
    stages = {
        name: {"status": "completed", "cached": False, "seconds": 1.0, "output": str(out)}
        for name, out in outputs.items()
    }
    path.mkdir(parents=True)
    summary = {"profile": "tiny-test", "run_id": path.name, "started_at": started}
    (path / "summary.json").write_text(json.dumps({**summary, "stages": stages}))


def _crash(build: stageio.StageBuild) -> stageio.Manifest:
    build.write_shard(0, pa.table({"id": ["a"] * 100}))
    raise RuntimeError("killed")


def _size(path: Path) -> int:
    return (
        path.stat().st_size
        if path.is_file()
        else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    )


def _snapshot(workdir: Path) -> dict[str, int]:
    return {str(p.relative_to(workdir)): p.stat().st_size for p in workdir.rglob("*")}


@pytest.fixture()
def workdir(tmp_path: Path) -> dict[str, Path]:
    """Two runs (old, new), an orphan output, a crashed build, and debris of interrupted writes."""
    w = tmp_path / "work"
    paths = {
        "old-data": _output(w, "download", "k-old"),
        "old-train": _output(w, "train", "t-old", steps=(2,)),
        "new-data": _output(w, "download", "k-new"),
        "new-train": _output(w, "train", "t-new", steps=(2, 4)),
        "orphan": _output(w, "download", "k-orphan"),
    }
    _summary(w / "runs" / "20260101-000000-aaaa", "2026-01-01T00:00:00+00:00",
             {"download": paths["old-data"], "train": paths["old-train"]})  # fmt: skip
    _summary(w / "runs" / "20260102-000000-bbbb", "2026-01-02T00:00:00+00:00",
             {"download": paths["new-data"], "train": paths["new-train"]})  # fmt: skip
    with pytest.raises(RuntimeError):
        stageio.build_stage(w, "caption", "c-crashed", _crash)
    paths["partial"] = w / "stages" / "caption" / ".c-crashed.partial"
    paths["trash"] = w / "stages" / "download" / ".k-gone.trash-1a2b3c4d"  # a crash mid-discard
    (paths["trash"] / "failures").mkdir(parents=True)
    (paths["trash"] / "failures" / "shard-00000.parquet").write_bytes(b"x" * 700)
    paths["tmp"] = paths["new-train"] / ".loss.png.0badf00d.tmp"
    paths["tmp"].write_bytes(b"y" * 300)
    paths["stale-checkpoint"] = paths["new-train"] / "checkpoints" / "step-000002"
    paths["root"] = w
    return paths


def _expected(paths: dict[str, Path]) -> dict[str, int]:
    """What keeping the newest run must free, per category, measured before gc runs."""
    return {
        "unreferenced outputs": sum(_size(paths[k]) for k in ("old-data", "old-train", "orphan")),
        "abandoned partial builds": _size(paths["partial"]),
        "old checkpoints": _size(paths["stale-checkpoint"]),
        "debris": 700 + 300,
    }


def test_dry_run_reports_and_gc_frees_the_same_bytes(workdir):
    w = workdir["root"]
    expected = _expected(workdir)
    assert all(expected.values())
    before = _snapshot(w)

    dry = collect_garbage(w, keep_runs=1, dry_run=True)
    assert dry.freed == expected
    assert _snapshot(w) == before  # nothing moved, nothing removed

    done = collect_garbage(w, keep_runs=1)
    assert done.freed == expected
    assert done.removed == {
        "unreferenced outputs": 3,
        "abandoned partial builds": 1,
        "old checkpoints": 1,
        "debris": 2,
    }
    for gone in ("old-data", "old-train", "orphan", "partial", "trash", "tmp", "stale-checkpoint"):
        assert not workdir[gone].exists(), gone
    new_data = stageio.load_manifest(workdir["new-data"])
    assert hash_tree(workdir["new-data"], skip=(stageio.MANIFEST,)) == new_data["fingerprint"]
    checkpoints = workdir["new-train"] / "checkpoints"
    assert list_checkpoints(checkpoints) == [4]
    assert load_latest(checkpoints)[1]["model"]["w"][0].item() == 4.0
    leftovers = [p for p in w.rglob("*") if ".trash-" in p.name or p.name.endswith(".tmp")]
    assert leftovers == []
    assert (w / "stages" / "download" / ".k-old.lock").exists()  # builders may hold it: kept

    again = collect_garbage(w, keep_runs=1)
    assert again.total == 0


def test_more_runs_and_sweeps_keep_their_outputs(workdir):
    w = workdir["root"]
    sweep = {"trials": [{"run": "x", "model_dir": str(workdir["orphan"] / "pipeline")}]}
    (w / "sweeps" / "lr").mkdir(parents=True)
    (w / "sweeps" / "lr" / "summary.json").write_text(json.dumps(sweep))

    report = collect_garbage(w, keep_runs=2)
    for kept in ("old-data", "old-train", "new-data", "new-train", "orphan"):
        assert stageio.load_manifest(workdir[kept]) is not None, kept
    assert report.freed["unreferenced outputs"] == 0
    assert report.kept == 5
    assert not workdir["partial"].exists()


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import pyarrow as pa
    from sdflow.store import stageio

    workdir, signal = Path(sys.argv[1]), Path(sys.argv[2])

    def work(build):
        name = build.write_shard(0, pa.table({"id": ["busy"] * 20}))
        (signal / "building").touch()
        while not (signal / "release").exists():
            time.sleep(0.05)
        return build.finish(counts={"kept": 20}, shards=[name])

    stageio.build_stage(workdir, "caption", "c-busy", work)
    """
)


def test_a_running_build_is_never_touched(workdir, tmp_path):
    w = workdir["root"]
    signal = tmp_path / "signal"
    signal.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(w), str(signal)])
    try:
        deadline = time.monotonic() + 60
        while not (signal / "building").exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        busy = w / "stages" / "caption" / ".c-busy.partial"
        before = _snapshot(busy)
        abandoned = _size(workdir["partial"])

        report = collect_garbage(w, keep_runs=1)
        assert report.skipped == [busy]
        assert _snapshot(busy) == before
        assert not workdir["partial"].exists()  # the abandoned one beside it goes
        assert report.freed["abandoned partial builds"] == abandoned
    finally:
        (signal / "release").touch()
        assert holder.wait(timeout=60) == 0
    assert stageio.load_manifest(w / "stages" / "caption" / "c-busy")["counts"] == {"kept": 20}


def test_cli_prints_what_it_would_free(workdir, capsys):
    w = workdir["root"]
    total = sum(_expected(workdir).values())
    assert main(["gc", "--workdir", str(w), "--keep-runs", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"Would free {humanize.naturalsize(total, binary=True)}:" in out
    assert "referenced by 1 run(s) and 0 sweep(s)" in out
    assert workdir["old-data"].exists()


def test_unreadable_summary_stops_gc_before_removing_anything(workdir, capsys):
    w = workdir["root"]
    broken = w / "runs" / "20260103-000000-cccc" / "summary.json"
    broken.parent.mkdir()
    broken.write_text('{"stages": ')
    assert main(["gc", "--workdir", str(w)]) == 2
    assert f"Cannot read {broken}" in capsys.readouterr().err
    assert workdir["orphan"].exists() and workdir["partial"].exists()


def test_removal_holds_the_lock_and_a_crash_mid_delete_leaves_only_trash(workdir, monkeypatch):
    w = workdir["root"]
    orphan = workdir["orphan"]
    size = _size(orphan)
    seen = []

    rmtree = gc_module.shutil.rmtree

    def crash(path, *args, **kwargs):  # the process dies while deleting the orphan output
        if not Path(path).name.startswith(".k-orphan"):
            return rmtree(path, *args, **kwargs)
        with stageio.try_stage_lock(orphan) as free:
            seen.append((Path(path).name, free))
        raise KeyboardInterrupt

    monkeypatch.setattr(gc_module.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        gc_module.collect_garbage(w, keep_runs=2)
    monkeypatch.undo()
    ((name, free),) = seen
    assert free is False  # no build could start under the delete
    assert name.startswith(".k-orphan.trash-") and not orphan.exists()  # renamed away first

    # Stages and entries go in sorted order: download's old trash went before the crash, train's
    # temp file was not reached.
    assert not workdir["trash"].exists() and workdir["tmp"].exists()
    report = gc_module.collect_garbage(w, keep_runs=2)
    assert report.freed["debris"] == size + 300
    assert report.freed["unreferenced outputs"] == 0
    assert not list(orphan.parent.glob(".k-orphan.trash-*"))


def test_a_manifest_path_out_of_its_output_deletes_nothing_outside(workdir, tmp_path):
    """`files.checkpoints: ../../../../outside` named checkpoint folders outside the workdir."""
    outside = tmp_path / "outside"
    for step in (1, 2, 3):
        (outside / f"step-{step:06d}").mkdir(parents=True)
        (outside / f"step-{step:06d}" / "keep.me").write_text("precious")
    manifest_path = workdir["new-train"] / stageio.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["checkpoints"] = "../../../../outside"
    manifest_path.write_text(json.dumps(manifest))
    assert (workdir["new-train"] / "../../../../outside").resolve() == outside  # the trap is set
    collect_garbage(workdir["root"], keep_runs=1)
    assert sorted(p.name for p in outside.iterdir()) == [f"step-{s:06d}" for s in (1, 2, 3)]


def test_symlinked_stage_folders_are_not_walked(workdir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "some-output").mkdir(parents=True)
    (elsewhere / "some-output" / "data.bin").write_bytes(b"z" * 100)
    (elsewhere / ".x.trash-1a2b3c4d").mkdir()  # debris-shaped, still not gc's
    (workdir["root"] / "stages" / "linked").symlink_to(elsewhere, target_is_directory=True)
    kept_link = workdir["new-data"].parent / "k-link"  # a kept output that is a symlink
    kept_link.symlink_to(elsewhere, target_is_directory=True)
    summary = workdir["root"] / "runs" / "20260102-000000-bbbb" / "summary.json"
    value = json.loads(summary.read_text())
    value["stages"]["extra"] = {"output": str(kept_link)}
    summary.write_text(json.dumps(value))
    collect_garbage(workdir["root"], keep_runs=1)
    assert sorted(p.name for p in elsewhere.iterdir()) == [".x.trash-1a2b3c4d", "some-output"]
    assert (elsewhere / "some-output" / "data.bin").read_bytes() == b"z" * 100


def test_a_running_run_holds_a_lease_gc_honours(workdir):
    """The run has no summary.json yet: its finished outputs are unreferenced, and kept."""
    from sdflow.store.lease import RunLease, held_leases

    lease = RunLease(workdir["root"] / "runs" / "20260103-000000-cccc")
    assert held_leases(workdir["root"]) == [lease.path]
    report = collect_garbage(workdir["root"], keep_runs=1)
    assert workdir["orphan"].is_dir() and workdir["old-data"].is_dir()
    assert report.removed["unreferenced outputs"] == 0
    assert not workdir["partial"].exists()  # the rest of gc still happens
    assert any("20260103-000000-cccc is running" in line for line in report.lines(workdir["root"]))
    lease.release()
    assert held_leases(workdir["root"]) == []
    collect_garbage(workdir["root"], keep_runs=1)
    assert not workdir["orphan"].exists()


def test_a_lease_dies_with_its_process(workdir):
    """A killed run leaves its LEASE file but no lock on it: gc goes ahead."""
    run_dir = workdir["root"] / "runs" / "20260103-000000-dddd"
    code = "import os, sys; from sdflow.store.lease import RunLease; l = RunLease(sys.argv[1]); os._exit(9)"
    subprocess.run([sys.executable, "-c", code, str(run_dir)], check=False)
    assert (run_dir / "LEASE").is_file()
    collect_garbage(workdir["root"], keep_runs=1)
    assert not workdir["orphan"].exists()
