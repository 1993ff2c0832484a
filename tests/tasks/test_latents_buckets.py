"""Aspect-ratio buckets end to end: a mixed-aspect folder, downloaded with `max_area`, through the
latents stage into non-square latents, then a short train on them."""

from __future__ import annotations

import logging

import torch
from fixtures.stages import GRID, autoencoder_stage, caption_stage, downloaded_rows
from safetensors.torch import load_file

from sdflow.profiles import load_profile
from sdflow.store.stageio import output_dir
from sdflow.training.latent_data import CachedLatents
from tasks.latents import cache_latents, latents_key
from tasks.train import train

# The rows of fixtures.stages.downloaded_rows: ORIGINALS, three of each, through GRID.
# Worked out by hand. Download (max_area, 32**2 px): 96x96 -> 32x32, 128x64 -> 45x22 (scale
# sqrt(1024 / 8192) = 0.354, floored), 64x128 -> 22x45, 96x72 -> 36x27 (scale 0.385). Nearest bucket
# by |log ratio|: 45/22 = 2.05 -> 40x24 (1.67; 48x16 is 3.0), 36/27 = 1.33 -> 40x24 (0.22 from it,
# 0.29 from 1:1). Cover and centre crop: 45x22 -> 49x24 (x 24/22), left (49 - 40) // 2 = 4;
# 22x45 -> 24x49, top 4; 36x27 -> 40x30 (x 40/36), top (30 - 24) // 2 = 3.
EXPECTED = {  # kind: (bucket, original (height, width), crop (top, left))
    "square": ("32x32", [96, 96], [0, 0]),
    "wide": ("40x24", [64, 128], [0, 4]),
    "tall": ("24x40", [128, 64], [4, 0]),
    "four_three": ("40x24", [72, 96], [3, 0]),
}


def test_mixed_aspect_folder_caches_non_square_latents_and_trains(
    tmp_path, one_torch_thread, caplog
):
    options = [
        "download.resize_mode=max_area",
        GRID,
        "eval.held_out_fraction=0",
        "train.batch_size=4",
        "train.max_steps=4",  # one epoch: 4 batches of 12 samples
        "train.checkpoint_every=2",
    ]
    config = load_profile("tiny-test", options)
    rows = downloaded_rows()
    assert {(r["width"], r["height"]) for r in rows} == {(32, 32), (45, 22), (22, 45), (36, 27)}
    upstream = {
        "caption": caption_stage(tmp_path, rows, per_shard=7),  # buckets mixed in both shards
        "autoencoder": autoencoder_stage(tmp_path, config.model, seed=0),
    }
    manifest = cache_latents(config, upstream, str(tmp_path))
    assert manifest["info"]["buckets"] == {
        "16x48": 0,
        "24x40": 3,
        "32x32": 3,
        "40x24": 6,
        "48x16": 0,  # fmt: skip
    }

    assert manifest["info"]["latent_size"] is None  # no one size: see the buckets
    seen: list[str] = []
    for shard in manifest["shards"]:
        tensors = load_file(output_dir(tmp_path, manifest) / shard)
        per_bucket = {k.split("@")[1]: len(v) for k, v in tensors.items() if k.startswith("mean@")}
        assert sum(per_bucket.values()) == len(tensors["bucket"])  # each row in one bucket
        for name, count in per_bucket.items():
            width, height = map(int, name.split("x"))
            assert tensors[f"mean_flip@{name}"].shape == (count, 4, height // 4, width // 4)
    data = CachedLatents(tmp_path, manifest)
    for i in range(len(data)):
        row = data[i]
        bucket, original, crop = EXPECTED[row["id"].rsplit("-", 1)[0]]
        width, height = map(int, bucket.split("x"))
        assert row["mean"].shape == (4, height // 4, width // 4)
        assert row["original_size"].tolist() == original
        assert row["crop_top_left"].tolist() == crop
        seen.append(row["id"])
    assert sorted(seen) == sorted(r["id"] for r in rows)  # every sample once

    # other shard sizes: a new key, every row reused from the shards above, bucket by bucket
    regrouped = config.model_copy(deep=True)
    regrouped.latents.shard_size = 5
    again = cache_latents(regrouped, upstream, str(tmp_path))
    assert again["key"] != manifest["key"] and again["info"]["rows_computed"] == 0
    assert len(again["shards"]) > len(manifest["shards"])
    reread = CachedLatents(tmp_path, again)
    for i in range(len(data)):
        assert reread[i]["id"] == data[i]["id"]
        assert all(torch.equal(reread[i][k], data[i][k]) for k in ("mean", "std_flip", "text"))

    other = config.model_copy(deep=True)
    other.latents.buckets = [(32, 32), (48, 16), (16, 48)]
    assert latents_key(other, upstream) != manifest["key"]  # the bucket set is in the key

    upstream |= {"latents": manifest}
    with caplog.at_level(logging.INFO, logger="sdflow.train"):
        trained = train(config, upstream, str(tmp_path))
    assert "bucket 24x40: 3 samples, 1 batches per epoch, the last of 3" in caplog.text
    # one epoch saw each of the 12 samples once (4 steps of batch 4 would be 16)
    assert trained["counts"]["steps"] == 4 and trained["counts"]["samples_seen"] == 12
    # 32x32 and 24x40 hold 3 samples, fewer than a batch of 4: kept, as one smaller batch each
    plan = trained["info"]["buckets"]
    assert plan["24x40"] == {"samples": 3, "batches": 1, "smaller_batch": 3}
    assert plan["40x24"] == {"samples": 6, "batches": 2, "smaller_batch": 2}
