"""WebDataset tar shards as img2dataset writes them (sdflow.data.sources.webdataset), through download."""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdflow.cli import main
from sdflow.config import SourceConfig
from sdflow.data import sources
from sdflow.errors import UserError
from sdflow.profiles import load_profile
from sdflow.store.stageio import read_failures, read_shards
from tasks.download import download


@pytest.fixture
def shards(tmp_path, make_image, make_shard):
    """img2dataset layout: 00000.tar + 00000.parquet, 00001.tar + 00001.parquet, 00001_stats.json."""
    root = tmp_path / "laion"
    meta = {"similarity": 0.31, "pwatermark": 0.1, "punsafe": 0.02, "status": "success"}
    images = {
        "000000000": make_image(48, 40, "JPEG", seed=0),
        "000000001": make_image(40, 48, "PNG", seed=1),
        "000000002": make_image(30, 30, "WEBP", seed=2),
        "000010000": make_image(64, 32, "JPEG", seed=3),
    }
    make_shard(
        root / "00000.tar",
        [
            ("000000000", {"jpg": images["000000000"], "txt": "a red cube", "json": meta}),
            ("000000001", {"png": images["000000001"], "json": {"caption": "from json"}}),
            ("000000002", {"webp": images["000000002"]}),  # no caption anywhere
            ("000000003", {"jpg": b"\xff\xd8\xff\xe0 corrupt", "txt": "broken"}),
            ("000000004", {"json": {"caption": "only json", "similarity": 0.2}}),  # no image
        ],
    )
    parquet = [
        {"key": "000000000", "similarity": 0.99, "original_width": 480, "AESTHETIC_SCORE": 5.5},
        {"key": "000000005", "similarity": 0.1, "original_width": 1, "AESTHETIC_SCORE": 1.0},
    ]
    pq.write_table(pa.Table.from_pylist(parquet), root / "00000.parquet")
    make_shard(root / "00001.tar", [("000010000", {"jpg": images["000010000"], "txt": "two"})])
    pq.write_table(
        pa.Table.from_pylist([{"key": "000010000", "punsafe": 0.7, "original_height": 900}]),
        root / "00001.parquet",
    )
    (root / "00001_stats.json").write_text("{}")
    return root, images


def rows_of(path: str, **options) -> list[sources.SourceRow]:
    return list(sources.open_rows(SourceConfig(kind="webdataset", path=path, **options)).rows)


def test_keys_captions_and_metadata_of_img2dataset_shards(shards):
    root, _ = shards
    rows = rows_of(f"{root}/{{00000..00001}}.tar")
    assert [r.id for r in rows] == [*(f"00000000{i}" for i in range(5)), "000010000"]
    assert [r.caption for r in rows] == [
        "a red cube",
        "from json",
        None,
        "broken",
        "only json",
        "two",
    ]
    metadata = [json.loads(r.metadata) if r.metadata else None for r in rows]
    assert metadata[0] == {  # the sample's json wins over the shard parquet; status not chosen
        "similarity": 0.31,
        "pwatermark": 0.1,
        "punsafe": 0.02,
        "original_width": 480,
        "AESTHETIC_SCORE": 5.5,
    }
    assert metadata[1:4] == [None, None, None]
    assert metadata[4] == {"similarity": 0.2}
    assert metadata[5] == {"punsafe": 0.7, "original_height": 900}
    assert rows[4].path is None  # json only: nothing to read
    assert rows[0].source == f"{root / '00000.tar'}:000000000"


def test_caption_and_metadata_fields_are_configurable(shards):
    root, _ = shards
    rows = rows_of(str(root), caption_column="caption", metadata_columns=["status", "punsafe"])
    assert [r.caption for r in rows][:2] == [None, "from json"]  # the txt member is not used
    assert json.loads(rows[0].metadata) == {"punsafe": 0.02, "status": "success"}


def test_download_stage_keeps_images_and_records_failures(tmp_path, shards):
    root, images = shards
    config = load_profile(
        "tiny-test",
        [
            "source.kind=webdataset",
            f"source.path={root}/*.tar",
            "download.resolution=16",
            "download.decode_workers=1",
        ],
    )
    manifest = download(config, {}, str(tmp_path / "work"))
    kept = {r["id"]: r for t in read_shards(tmp_path / "work", manifest) for r in t.to_pylist()}
    failed = {r["id"]: r["reason"] for r in read_failures(tmp_path / "work", manifest).to_pylist()}
    assert failed == {"000000003": "decode_error", "000000004": "missing_image"}
    assert sorted(kept) == sorted(images)
    for key, data in images.items():
        assert kept[key]["content_hash"] == hashlib.sha256(data).hexdigest()
    assert (kept["000010000"]["orig_width"], kept["000010000"]["orig_height"]) == (64, 32)
    assert json.loads(kept["000010000"]["metadata"]) == {"punsafe": 0.7, "original_height": 900}
    assert kept["000000002"]["caption"] is None and kept["000000002"]["metadata"] is None


def test_image_members_get_the_size_limit(tmp_path, make_image, make_shard):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    big = buffer.getvalue()
    assert len(big) > 4096
    make_shard(tmp_path / "s.tar", [("big", {"png": big}), ("small", {"png": make_image()})])
    overrides = ["source.kind=webdataset", f"source.path={tmp_path}/s.tar"]
    config = load_profile("tiny-test", [*overrides, "download.max_bytes=4096"])
    manifest = download(config, {}, str(tmp_path / "work"))
    failed = read_failures(tmp_path / "work", manifest).to_pylist()
    assert [(r["id"], r["reason"]) for r in failed] == [("big", "too_large")]
    assert manifest["counts"]["kept"] == 1


def test_symlinked_shards_are_read(tmp_path, shards):
    root, images = shards
    links = tmp_path / "links"
    links.mkdir()
    (links / "a.tar").symlink_to(root / "00001.tar")
    config = load_profile("tiny-test", ["source.kind=webdataset", f"source.path={links}/a.tar"])
    manifest = download(config, {}, str(tmp_path / "work"))
    (row,) = next(read_shards(tmp_path / "work", manifest)).to_pylist()
    assert row["content_hash"] == hashlib.sha256(images["000010000"]).hexdigest()


def test_duplicate_keys_fail_as_duplicate_ids(tmp_path, make_image, make_shard):
    make_shard(tmp_path / "a.tar", [("k", {"png": make_image(seed=1)})])
    make_shard(tmp_path / "b.tar", [("k", {"png": make_image(seed=2)})])
    config = load_profile(
        "tiny-test", ["source.kind=webdataset", f"source.path={tmp_path}/{{a,b}}.tar"]
    )
    manifest = download(config, {}, str(tmp_path / "work"))
    assert manifest["counts"]["failed_by_reason"] == {"duplicate_id": 1}


def test_fingerprint_follows_the_tar_bytes(shards, make_image, make_shard):
    root, _ = shards
    config = SourceConfig(kind="webdataset", path=f"{root}/*.tar")
    before = sources.fingerprint(config)
    assert sources.fingerprint(SourceConfig(kind="webdataset", path=str(root))) == before
    shard = root / "00001.tar"
    stat = shard.stat()
    make_shard(shard, [("000010000", {"jpg": make_image(64, 32, "JPEG", seed=9), "txt": "two"})])
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    edited = sources.fingerprint(config)
    assert edited != before
    pq.write_table(pa.table({"key": ["000010000"], "punsafe": [0.1]}), root / "00001.parquet")
    assert sources.fingerprint(config) not in (before, edited)


def test_patterns_that_match_no_tar_are_user_errors(tmp_path, shards, capsys):
    root, _ = shards
    for path in (f"{tmp_path}/nowhere/*.tar", f"{root}/{{00000..00002}}.tar", f"{root}/*.parquet"):
        with pytest.raises(UserError, match="matches no .tar file"):
            rows_of(path)
    with pytest.raises(UserError, match="00002.tar' matches no .tar file"):
        rows_of(f"{root}/{{00000..00002}}.tar")
    overrides = ["--set", "source.kind=webdataset", "--set", f"source.path={tmp_path}/x/*.tar"]
    assert main(["check", "tiny-test", *overrides]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/x/*.tar' matches no .tar file" in err and "brace range" in err
