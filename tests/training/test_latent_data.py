"""The latent shard format and the datasets the train stage reads."""

from __future__ import annotations

import io
import pickle

import pyarrow as pa
import pytest
import torch
from PIL import Image

from sdflow.store.splits import is_held_out
from sdflow.store.stageio import build_stage
from sdflow.training.latent_data import (
    CachedLatents,
    CaptionedImages,
    ShardRows,
    latent_shard_name,
    pack_rows,
    read_shard_ids,
    save_tensors,
    write_latent_shard,
)


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


@pytest.mark.parametrize(("rows_info", "resident_bytes"), [(True, 0), (False, 0), (True, 2**20)])
def test_cached_latents_index_across_shards(tmp_path, rows_info, resident_bytes):
    """Rows read per tensor from the files (0: no cache is small enough to hold), or sliced from
    shards held in memory."""
    manifest = latents_stage(tmp_path, [3, 0, 5, 2], rows_info=rows_info)
    data = CachedLatents(tmp_path, manifest, open_shards=1, resident_bytes=resident_bytes)
    assert data.resident == bool(resident_bytes)
    assert len(data) == 10
    assert data.starts == [0, 3, 3, 8, 10]
    for k in [9, 0, 4, 3, 8, 2]:  # random order, across shards, with a one-shard cache
        row = data[k]
        assert row["id"] == f"r{k}"
        assert torch.equal(row["mean"], torch.full((4, 2, 2), float(k)))
        assert torch.equal(row["std"], torch.full((4, 2, 2), k + 0.5))
        assert torch.equal(row["mean_flip"], -row["mean"])
        assert torch.equal(row["text"], torch.full((3, 8), float(k)))
    with pytest.raises(IndexError):
        data[10]


def test_bucketed_rows_read_back_at_their_own_shapes(tmp_path):
    # rows 0, 2, 3 in a 16x8 px bucket (latents 4x2 at a 4x VAE), rows 1, 4 in an 8x16 one
    shapes = {0: (16, 8), 1: (8, 16), 2: (16, 8), 3: (16, 8), 4: (8, 16)}
    rows = [
        {
            "mean": torch.full((1, 4, h // 4, w // 4), float(k)),
            "text": torch.full((1, 3, 8), float(k)),
            "original_size": torch.tensor([[100 + k, 200 + k]]),
            "crop_top_left": torch.tensor([[k, 0]]),
            "bucket": torch.tensor([[w, h]]),
        }
        for k, (w, h) in shapes.items()
    ]
    tensors = pack_rows(rows)
    assert tensors["mean@16x8"].shape == (3, 4, 2, 4) and tensors["mean@8x16"].shape == (2, 4, 4, 2)
    assert "mean" not in tensors and tensors["text"].shape == (5, 3, 8)

    def work(build):
        write_latent_shard(build.path / latent_shard_name(0), tensors, [f"r{k}" for k in shapes])
        return build.finish(counts={}, shards=[latent_shard_name(0)], files={}, info={})

    manifest = build_stage(tmp_path, "latents", "bucketed", work)
    data = CachedLatents(tmp_path, manifest)
    assert data.buckets() == ["@16x8", "@8x16", "@16x8", "@16x8", "@8x16"]
    reread = ShardRows(data.paths[0])
    for k, (w, h) in shapes.items():
        row = data[k]
        assert row["id"] == f"r{k}" and row["std"] is None
        assert torch.equal(row["mean"], torch.full((4, h // 4, w // 4), float(k)))
        assert row["original_size"].tolist() == [100 + k, 200 + k]
        assert row["crop_top_left"].tolist() == [k, 0]
        assert torch.equal(reread[k]["mean"], rows[k]["mean"])  # what the stage reuses
        assert reread[k]["bucket"].tolist() == [[w, h]]


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
    for k in reversed(range(len(data))):
        row = data[k]
        i = int(row["id"][1:])
        assert row["id"] == expected[k]
        assert row["caption"] == (f"caption {i}" if i % 3 else "")
        assert row["pixels"].shape == (3, 16, 16)
        torch.testing.assert_close(row["pixels"], torch.full((3, 16, 16), i * 10 / 127.5 - 1))
    assert pickle.loads(pickle.dumps(data))[0]["id"] == expected[0]
