"""`make bench`'s closing table: benches leave results (bench/results.py), bench/summary.py joins them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import results  # noqa: E402


def test_results_land_in_the_folder_and_summary_prints_one_table(tmp_path, monkeypatch):
    monkeypatch.setenv(results.RESULTS_ENV, str(tmp_path))
    download = results.comparison("5,000 JPEGs", "images/s", 450.0, "img2dataset", 300.0, 1.5)
    startup = results.comparison(
        "first stage", "s", 4.0, "target", 5.0, goal=1.0, higher_is_better=False
    )
    train = results.comparison("train step", "steps/s", 12.0, "reference", 10.0, goal=1.5)
    memory = results.comparison("peak memory", "MiB", 512.0)
    results.save("download-5000", "download", [download], {"raw": 1})
    results.save("startup", "startup", [startup, train], {})
    results.save("data-scale", "data_scale", [memory], [])
    stored = json.loads((tmp_path / "download-5000.json").read_text())
    assert stored["detail"] == {"raw": 1} and stored["rows"][0]["ratio"] == 1.5

    done = subprocess.run(
        [sys.executable, str(BENCH / "summary.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "| bench | case | sdflow | peer | ratio | goal | met |"
    # files in name order: data-scale, download-5000, startup (two rows)
    assert lines[2:] == [
        "| data_scale | peak memory | 512 MiB | — | — |  |  |",
        "| download | 5,000 JPEGs | 450 images/s | img2dataset: 300 images/s | 1.50× | ≥ 1.5× | yes |",
        "| startup | first stage | 4 s | target: 5 s | 1.25× | ≥ 1× | yes |",
        "| startup | train step | 12 steps/s | reference: 10 steps/s | 1.20× | ≥ 1.5× | no |",
    ]


def test_nothing_is_written_without_the_variable_and_summary_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv(results.RESULTS_ENV, raising=False)
    assert results.save("x", "x", [results.comparison("c", "s", 1.0)], {}) is None
    done = subprocess.run(
        [sys.executable, str(BENCH / "summary.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 1 and "no bench results" in done.stderr


def test_download_bench_asks_1_5x_of_a_normal_host_and_1x_of_a_small_one(tmp_path, monkeypatch):
    import download  # bench/download.py

    monkeypatch.setenv(results.RESULTS_ENV, str(tmp_path))
    for small, cap in ((False, None), (True, None), (False, 16)):
        download.save_result(
            {"images": 5000, "small_host": small, "format": "jpeg", "resolution": 64,
             "budget": "2x64", "sdflow_shards_in": "threads", "repeats": 3, "per_host_cap": cap,
             "sdflow_images_per_second": 300.0, "img2dataset_images_per_second": 240.0,
             "sdflow_cpu_s_per_1000": 2.4, "img2dataset_cpu_s_per_1000": 3.6}
        )  # fmt: skip
    normal = json.loads((tmp_path / "download-5000.json").read_text())["rows"]
    small = json.loads((tmp_path / "download-5000-small-host.json").read_text())["rows"]
    capped = json.loads((tmp_path / "download-5000-cap16.json").read_text())["rows"]
    assert [(r["ratio"], r["goal"]) for r in normal] == [(1.25, 1.5), (1.5, None)]
    assert [(r["ratio"], r["goal"]) for r in small] == [(1.25, 1.0), (1.5, None)]
    assert [(r["ratio"], r["goal"]) for r in capped] == [(1.25, None), (1.5, None)]  # no target
    assert "sdflow per-host cap 16" in capped[0]["case"]
    assert small[0]["case"].startswith("5,000 JPEGs → 64 px jpeg, small host, 2x64")
