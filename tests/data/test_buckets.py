"""Bucket sets, nearest-bucket assignment and the bucket settings' errors."""

from __future__ import annotations

import random

import pytest

from sdflow.data.buckets import bucket_set, nearest_bucket
from sdflow.profiles import ConfigError, load_profile

MAX_AREA = "download.resize_mode=max_area"


def test_a_1024_grid_has_the_usual_sdxl_buckets_within_the_area():
    config = load_profile("tiny-test", [MAX_AREA, "latents.buckets={resolution: 1024}"])
    buckets = bucket_set(config.latents, config.download.resolution)
    # the buckets SDXL was trained at (Podell et al. 2023, arXiv 2307.01952, appendix I)
    assert {(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (896, 1152)} <= set(buckets)
    assert all(w * h <= 1024**2 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(512 <= side <= 2048 for bucket in buckets for side in bucket)
    assert {(h, w) for w, h in buckets} == set(buckets)  # both orientations
    assert [w / h for w, h in buckets] == sorted(w / h for w, h in buckets)


def test_none_is_one_square_bucket_and_a_list_is_taken_as_given():
    config = load_profile("tiny-test")
    assert bucket_set(config.latents, 32) == [(32, 32)]
    listed = load_profile("tiny-test", [MAX_AREA, "latents.buckets=[[48, 16], [32, 32]]"])
    assert bucket_set(listed.latents, 32) == [(32, 32), (48, 16)]


def test_nearest_bucket_by_log_ratio_with_an_order_free_tie_break():
    buckets = [(16, 48), (24, 40), (32, 32), (40, 24), (48, 16)]
    assert nearest_bucket(200, 100, buckets) == (40, 24)  # 2.0: 1.67 is nearer than 3.0
    assert nearest_bucket(100, 220, buckets) == (24, 40)  # 1:2.2, log distance .28 vs .31
    assert nearest_bucket(300, 100, buckets) == (48, 16)
    # 1:1 is exactly as far (in log ratio) from 2:1 as from 1:2: the smaller width wins
    for _ in range(3):
        random.shuffle(tied := [(32, 16), (16, 32)])
        assert nearest_bucket(50, 50, tied) == (16, 32)
    # equal ratios: the larger area wins
    assert nearest_bucket(50, 50, [(16, 16), (32, 32), (24, 24)]) == (32, 32)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["latents.buckets={resolution: 64}"], "download.resize_mode is 'center_crop'"),
        (
            [MAX_AREA, "latents.buckets={resolution: 64}", "train.cache_latents=false"],
            "train.cache_latents is false",
        ),
        ([MAX_AREA, "latents.buckets={resolution: 64, step: 12}"], "step = 12 is not a multiple"),
        ([MAX_AREA, "latents.buckets={resolution: 64, min_side: 128}"], "leave no bucket"),
        ([MAX_AREA, "latents.buckets=[[64, 30]]"], r"\[64, 30\]; allowed: sides"),
        ([MAX_AREA, "latents.buckets=[[64, 32], [64, 32]]"], "lists a bucket twice"),
        ([MAX_AREA, "latents.buckets=square"], "latents.buckets"),
        ([MAX_AREA, "latents.buckets=7"], "must be 'none', a grid"),
    ],
)
def test_bad_bucket_settings_fail_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_profile("tiny-test", overrides)
