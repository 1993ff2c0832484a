"""`datasets` sources from local directories and files (sdflow.data.sources.hf); never the hub."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures.hub import cache_download
from PIL import Image

from sdflow.config import RunConfig, SourceConfig
from sdflow.data import sources
from sdflow.errors import UserError
from sdflow.store.stageio import read_failures


def rows_of(path, **options) -> list[sources.SourceRow]:
    return list(sources.open_rows(SourceConfig(kind="hf", path=str(path), **options)).rows)


def image_bytes(row: sources.SourceRow) -> bytes:
    return row.data if row.data is not None else open(row.path, "rb").read()


@pytest.fixture
def imagefolder(tmp_path, make_image):
    root = tmp_path / "imagefolder"
    root.mkdir()
    names = ["x0.png", "x1.png", "x2.jpg"]
    for seed, name in enumerate(names):
        (root / name).write_bytes(
            make_image(fmt="JPEG" if name.endswith("jpg") else "PNG", seed=seed)
        )
    lines = [
        json.dumps({"file_name": n, "text": f"caption {n}", "key": f"k{i}"})
        for i, n in enumerate(names)
    ]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_local_imagefolder_gives_undecoded_images_and_captions(imagefolder):
    rows = rows_of(imagefolder)
    assert len(rows) == 3
    assert [r.id for r in rows] == ["00000000", "00000001", "00000002"]
    assert sorted(r.caption for r in rows) == ["caption x0.png", "caption x1.png", "caption x2.jpg"]
    for row in rows:
        name = row.caption.removeprefix("caption ")
        assert image_bytes(row) == (imagefolder / name).read_bytes()  # bytes as stored, not decoded
        assert row.source.startswith(str(imagefolder))


def test_id_column_and_limit(imagefolder):
    rows = rows_of(imagefolder, id_column="key", limit=2)
    assert len(rows) == 2
    assert {r.id for r in rows} <= {"k0", "k1", "k2"}


def test_parquet_file_with_binary_images(tmp_path, make_image):
    table = pa.Table.from_pylist(
        [{"img": make_image(seed=i), "caption": f"c{i}"} for i in range(3)]
    )
    path = tmp_path / "data.parquet"
    pq.write_table(table, path)
    rows = rows_of(path, image_column="img")
    assert [r.caption for r in rows] == ["c0", "c1", "c2"]
    assert Image.open(io.BytesIO(rows[1].data)).size == (48, 40)


def test_missing_columns_and_splits_are_user_errors(imagefolder):
    with pytest.raises(UserError, match="picture"):
        rows_of(imagefolder, image_column="picture")
    with pytest.raises(UserError, match="validation"):
        rows_of(imagefolder, split="validation")


def test_fingerprint_of_a_local_dataset_follows_its_content(imagefolder, make_image):
    config = SourceConfig(kind="hf", path=str(imagefolder))
    before = sources.fingerprint(config)
    (imagefolder / "x1.png").write_bytes(make_image(seed=7))
    assert sources.fingerprint(config) != before


def test_fingerprint_of_a_hub_name_is_its_resolved_commit(hub_cache):
    for revision, commit in (("v1.0", "1" * 40), ("v2.0", "2" * 40)):
        cache_download(hub_cache, "someone/some-dataset", revision, commit, "dataset")
    pinned = SourceConfig(kind="hf", path="someone/some-dataset", revision="v1.0")
    other = SourceConfig(kind="hf", path="someone/some-dataset", revision="v2.0")
    assert sources.fingerprint(pinned) == f"hub:someone/some-dataset@{'1' * 40}"
    assert sources.fingerprint(other) == f"hub:someone/some-dataset@{'2' * 40}"


def test_image_paths_stay_inside_the_dataset_and_reads_are_bounded(tmp_path, make_image):
    from tasks.download import download

    (tmp_path / "outside.png").write_bytes(make_image(seed=1))
    root = tmp_path / "dataset"
    root.mkdir()
    (root / "ok.png").write_bytes(make_image(seed=2))
    big = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    Image.fromarray(big).save(root / "big.png")  # ~12 KB of noise: over max_bytes
    paths = ["ok.png", "../outside.png", str(tmp_path / "outside.png"), "big.png"]
    pq.write_table(pa.table({"image": paths, "caption": list("abcd")}), root / "rows.parquet")

    config = RunConfig.model_validate(
        {
            "source": {"kind": "hf", "path": str(root / "rows.parquet")},
            "download": {"resolution": 16, "decode_workers": 1, "max_bytes": 8192},
        }
    )
    manifest = download(config, {}, str(tmp_path / "work"))
    failures = read_failures(tmp_path / "work", manifest).to_pylist()
    assert {f["id"]: f["reason"] for f in failures} == {
        "00000001": "outside_source",
        "00000002": "outside_source",
        "00000003": "too_large",
    }
    assert (root / "big.png").stat().st_size > 8192
    assert manifest["counts"]["kept"] == 1


def test_a_hub_dataset_row_may_not_name_a_local_file(tmp_path, make_image):
    from sdflow.data.imaging import Rejected
    from sdflow.data.sources import read_inside

    (tmp_path / "x.png").write_bytes(make_image())
    with pytest.raises(Rejected, match="no local directory") as caught:
        read_inside(str(tmp_path / "x.png"), None, 1 << 20)
    assert caught.value.reason == "outside_source"
