"""bench/flow_scale.py's arithmetic on a fabricated run: shares of wall time outside shard work."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def flow_scale(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the bench imports its neighbours by plain name
    return importlib.import_module("flow_scale")


def _manifest(busy: float, shards: int, rows: int | None = None) -> dict:
    counts = {"input": rows} if rows is not None else {}
    return {"counts": counts, "info": {"shard_busy_seconds": busy, "shards_timed": shards}}


def test_outside_shares_of_a_fabricated_run(flow_scale):
    summary = {"stages": {"download": {"seconds": 50.0}, "filter": {"seconds": 20.0},
                          "caption": {"seconds": 10.0}}}  # fmt: skip
    manifests = {
        "download": _manifest(45.0, 10, rows=8000),
        "filter": _manifest(15.0, 10),
        "caption": _manifest(9.0, 10),
    }
    result = flow_scale.outside_shares(summary, manifests, process_seconds=100.0)
    # by hand: download 5/50, filter 5/20, caption 1/10; stages 11/80; process 31/100
    assert result["stages"]["download"]["outside_share"] == 0.1
    assert result["stages"]["filter"]["outside_share"] == 0.25
    assert result["stages"]["caption"]["outside_share"] == 0.1
    assert result["outside_share_stages"] == pytest.approx(0.1375, abs=1e-3)
    assert result["outside_share_process"] == 0.31
    assert result["rows_per_second"] == 80.0 and result["stage_seconds"] == 80.0


def test_profile_stops_after_caption_keep_and_validates(flow_scale, tmp_path):
    from sdflow.profiles import load_profile

    listing = tmp_path / "urls.csv"
    listing.write_text("url,caption\nhttp://127.0.0.1:1/0.jpg,a row\n")
    profile = tmp_path / "p.yaml"
    profile.write_text(flow_scale.profile_text(listing, shard_size=250, max_workers=3))
    config = load_profile(str(profile), [])
    assert config.caption.backend == "keep" and config.source.path == str(listing)
    assert config.download.shard_size == 250 and config.runner.max_workers == 3
