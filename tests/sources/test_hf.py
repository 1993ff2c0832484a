"""`datasets` sources from local directories and files (sdflow.sources.hf); never the hub."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdflow import sources
from sdflow.config import SourceConfig
from sdflow.errors import UserError


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


def test_fingerprint_of_a_hub_name_includes_the_revision():
    pinned = SourceConfig(kind="hf", path="someone/some-dataset", revision="v1.0")
    other = SourceConfig(kind="hf", path="someone/some-dataset", revision="v2.0")
    assert "someone/some-dataset@" in sources.fingerprint(pinned)
    assert sources.fingerprint(pinned) != sources.fingerprint(other)
