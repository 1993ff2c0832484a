"""The latent shard format and the datasets the train stage reads."""

from __future__ import annotations

import io
import pickle

import pyarrow as pa
import pytest
import torch
from PIL import Image

from sdflow.latent_data import (
    CachedLatents,
    CaptionedImages,
    ShardShuffleSampler,
    latent_shard_name,
    read_shard_ids,
    save_tensors,
    write_latent_shard,
)
from sdflow.splits import is_held_out
from sdflow.stageio import build_stage


def latents_stage(workdir, sizes: list[int], flip: bool = True, rows_info: bool = True) -> dict:
    """A latents-stage output whose row k holds the value k everywhere, with id `r<k>`."""

    def work(build):
        names, start = [], 0
        for index, n in enumerate(sizes):
            values = torch.arange(start, start + n, dtype=torch.float32)
            tensors = {
                "mean": values.view(n, 1, 1, 1).expand(n, 4, 2, 2),
                "std": values.view(n, 1, 1, 1).expand(n, 4, 2, 2) + 0.5,
                "text": values.view(n, 1, 1).expand(n, 3, 8),
            }
            if flip:
                tensors |= {"mean_flip": -tensors["mean"], "std_flip": tensors["std"]}
            names.append(latent_shard_name(index))
            ids = [f"r{k}" for k in range(start, start + n)]
            write_latent_shard(build.path / names[-1], tensors, ids)
            start += n
        save_tensors(build.path / "empty_prompt.safetensors", {"text": torch.zeros(3, 8)}, {})
        info = {"rows_per_shard": sizes} if rows_info else {}
        files = {"empty_prompt": "empty_prompt.safetensors"}
        return build.finish(counts={}, shards=names, files=files, info=info)

    return build_stage(workdir, "latents", f"fixture-{sizes}-{flip}-{rows_info}", work)


@pytest.mark.parametrize("rows_info", [True, False])
def test_cached_latents_index_across_shards(tmp_path, rows_info):
    manifest = latents_stage(tmp_path, [3, 0, 5, 2], rows_info=rows_info)
    data = CachedLatents(tmp_path, manifest, open_shards=1)
    assert len(data) == 10
    assert [r.start for r in data.shard_ranges()] == [0, 3, 3, 8]
    for k in [9, 0, 4, 3, 8, 2]:  # random order, across shards, with a one-shard cache
        row = data[k]
        assert row["id"] == f"r{k}"
        assert torch.equal(row["mean"], torch.full((4, 2, 2), float(k)))
        assert torch.equal(row["std"], torch.full((4, 2, 2), k + 0.5))
        assert torch.equal(row["mean_flip"], -row["mean"])
        assert torch.equal(row["text"], torch.full((3, 8), float(k)))
    with pytest.raises(IndexError):
        data[10]


def test_cached_latents_without_flip_and_across_processes(tmp_path):
    manifest = latents_stage(tmp_path, [2, 2], flip=False)
    data = CachedLatents(tmp_path, manifest)
    assert data[1]["mean_flip"] is None and data[1]["std_flip"] is None
    clone = pickle.loads(pickle.dumps(data))  # what a DataLoader worker receives
    assert clone[3]["id"] == "r3"


def test_shard_rows_must_match_ids(tmp_path):
    with pytest.raises(ValueError, match="one row per id"):
        write_latent_shard(tmp_path / "x.safetensors", {"mean": torch.zeros(2, 1)}, ["a"])
    write_latent_shard(tmp_path / "y.safetensors", {"mean": torch.zeros(2, 1)}, ["a", "b"])
    assert read_shard_ids(tmp_path / "y.safetensors") == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["y.safetensors"]  # no temp files left


def test_shard_shuffle_sampler_is_a_shard_local_permutation():
    ranges = [range(0, 4), range(4, 4), range(4, 10), range(10, 13)]
    sampler = ShardShuffleSampler(ranges, seed=7)
    order = list(sampler)
    assert sorted(order) == list(range(13)) and len(sampler) == 13
    shard_of = [next(i for i, r in enumerate(ranges) if k in r) for k in order]
    runs = [s for i, s in enumerate(shard_of) if i == 0 or s != shard_of[i - 1]]
    assert sorted(runs) == [0, 2, 3]  # each shard visited in one contiguous run
    assert list(ShardShuffleSampler(ranges, seed=7)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order


def caption_stage(workdir, count: int) -> dict:
    def png(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (40, 32), (value, value, value)).save(buffer, format="PNG")
        return buffer.getvalue()

    rows = [
        {"id": f"c{i}", "image": png(i * 10), "caption": f"caption {i}" if i % 3 else None}
        for i in range(count)
    ]

    def work(build):
        names = [
            build.write_shard(s, pa.Table.from_pylist(rows[s * 5 : s * 5 + 5])) for s in (0, 1)
        ]
        return build.finish(counts={}, shards=names)

    return build_stage(workdir, "caption", "fixture", work)


def test_captioned_images_are_the_training_split(tmp_path):
    manifest = caption_stage(tmp_path, 10)
    expected = [f"c{i}" for i in range(10) if not is_held_out(f"c{i}", 0.3)]
    assert 0 < len(expected) < 10
    data = CaptionedImages(tmp_path, manifest, resolution=16, held_out_fraction=0.3)
    assert len(data) == len(expected)
    assert sum(len(r) for r in data.shard_ranges()) == len(data)
    for k in reversed(range(len(data))):
        row = data[k]
        i = int(row["id"][1:])
        assert row["id"] == expected[k]
        assert row["caption"] == (f"caption {i}" if i % 3 else "")
        assert row["pixels"].shape == (3, 16, 16)
        torch.testing.assert_close(row["pixels"], torch.full((3, 16, 16), i * 10 / 127.5 - 1))
    assert pickle.loads(pickle.dumps(data))[0]["id"] == expected[0]
