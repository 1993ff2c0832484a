"""A run holds its lease (sdflow.store.lease) from its start until its summary is written."""

from __future__ import annotations

from flows.tracking import RunTracker
from sdflow.profiles import load_profile
from sdflow.store.lease import held_leases


def test_the_run_tracker_holds_a_lease_until_finish(tmp_path, monkeypatch):
    tracker = RunTracker(load_profile("tiny-test", []), "tiny-test", str(tmp_path))
    assert held_leases(tmp_path) == [tracker.run_dir / "LEASE"]
    monkeypatch.setattr(RunTracker, "_dataset_report", lambda self: None)
    monkeypatch.setattr("flows.tracking._best_effort", lambda *args: None)
    tracker.finish()
    assert (tracker.run_dir / "summary.json").is_file()
    assert held_leases(tmp_path) == []
