"""Sweep settings and ranking (sdflow/sweeps.py): grids, random draws, the best setting."""

from __future__ import annotations

import math

import pytest

from sdflow.errors import UserError
from sdflow.ops import sweeps


def test_a_grid_is_the_product_of_its_values():
    grid = sweeps.parse_grid(["train.lr=1e-4, 3e-5", "train.lora_rank=4,16"])
    assert grid == {"train.lr": ["1e-4", "3e-5"], "train.lora_rank": ["4", "16"]}
    assert sweeps.expand(grid) == [
        {"train.lr": "1e-4", "train.lora_rank": "4"},
        {"train.lr": "1e-4", "train.lora_rank": "16"},
        {"train.lr": "3e-5", "train.lora_rank": "4"},
        {"train.lr": "3e-5", "train.lora_rank": "16"},
    ]
    assert sweeps.overrides_of({"train.lr": "1e-4"}) == ["train.lr=1e-4"]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["train.lr"], "write KEY=VALUE"),
        (["=1,2"], "write KEY=VALUE"),
        (["train.lr=1", "train.lr=2"], "twice"),
        ([], "at least one --grid"),
    ],
)
def test_malformed_grids_are_refused(items, message):
    with pytest.raises(UserError, match=message):
        sweeps.parse_grid(items)


def test_random_draws_are_seeded_distinct_and_inside_their_ranges():
    grid = {"train.lr": ["1e-5:1e-2"], "train.lora_rank": ["4", "8", "16"], "train.seed": ["0:9"]}
    first = sweeps.expand(grid, draws=6, seed=3)
    assert first == sweeps.expand(grid, draws=6, seed=3)
    assert first != sweeps.expand(grid, draws=6, seed=4)
    assert len({tuple(s.items()) for s in first}) == 6
    lrs = [float(s["train.lr"]) for s in first]
    assert all(1e-5 <= lr <= 1e-2 for lr in lrs)
    # log-uniform: spread over decades, not bunched near the top as a uniform draw would be
    assert min(math.log10(lr) for lr in lrs) < -3
    assert {s["train.lora_rank"] for s in first} <= {"4", "8", "16"}
    assert all(s["train.seed"].isdigit() and 0 <= int(s["train.seed"]) <= 9 for s in first)
    with pytest.raises(UserError, match="ranges need --random"):
        sweeps.expand(grid)


def test_the_best_setting_follows_the_metrics_direction():
    results = [
        {
            "setting": {"train.lr": "a"},
            "status": "completed",
            "metrics": {"fid": 9.0, "clip_score": 20.0},
        },
        {"setting": {"train.lr": "b"}, "status": "failed", "error": "boom"},
        {
            "setting": {"train.lr": "c"},
            "status": "completed",
            "metrics": {"fid": 4.0, "clip_score": 10.0},
        },
        {"setting": {"train.lr": "d"}, "status": "completed", "metrics": {"fid": float("nan")}},
    ]
    assert sweeps.best_setting(results, "fid") == 2  # lower is better
    assert sweeps.best_setting(results, "clip_score") == 0  # higher is better
    assert sweeps.best_setting(results, "kid") is None  # no setting has it
    rows = sweeps.table_rows(results, best=2)
    assert [r["best"] for r in rows] == ["", "", "★", ""]
    assert rows[1]["status"] == "failed" and rows[1]["model_dir"] == "boom"
    assert rows[2]["fid"] == 4.0 and rows[0]["clip_score"] == 20.0
    with pytest.raises(UserError, match="not one of"):
        sweeps.check_metric("accuracy")


def test_settings_run_one_per_gpu_slot_on_a_cuda_host_and_one_at_a_time_elsewhere():
    assert sweeps.parallelism(None, gpu_slots=4, cuda=True) == 4  # `sdflow deploy --gpus 4`
    assert sweeps.parallelism(None, gpu_slots=0, cuda=True) == 1  # no slots: no device each
    assert sweeps.parallelism(None, gpu_slots=4, cuda=False) == 1  # a CPU host
    assert sweeps.parallelism(3, gpu_slots=0, cuda=False) == 3  # asked for: as asked
    with pytest.raises(UserError, match="parallel 0: train at least one setting"):
        sweeps.parallelism(0, gpu_slots=2, cuda=True)
