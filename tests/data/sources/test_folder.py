"""Image folders with sidecar captions or metadata.jsonl (sdflow.data.sources.folder)."""

from __future__ import annotations

import json
import os

import pytest

from sdflow.config import RunConfig, SourceConfig
from sdflow.data import sources
from sdflow.errors import UserError
from sdflow.store.stageio import read_failures


def rows_of(path, **options) -> list[sources.SourceRow]:
    return list(sources.open_rows(SourceConfig(kind="folder", path=str(path), **options)).rows)


@pytest.fixture
def folder(tmp_path, make_image):
    """b.png (sidecar), a.jpg (metadata), sub/c.webp (nested metadata), d.bmp (no caption)."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "b.png").write_bytes(make_image(fmt="PNG", seed=1))
    (root / "b.txt").write_text("  a sidecar caption \n")
    (root / "a.jpg").write_bytes(make_image(fmt="JPEG", seed=2))
    (root / "sub" / "c.webp").write_bytes(make_image(fmt="WEBP", seed=3))
    (root / "d.bmp").write_bytes(make_image(fmt="BMP", seed=4))
    (root / ".hidden.png").write_bytes(make_image(seed=5))
    (root / "notes.md").write_text("not an image")
    (root / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.jpg", "text": "from metadata", "uid": "A"})
        + "\n"
        + json.dumps({"file_name": "b.png", "text": "loses to the sidecar", "uid": "B"})
        + "\n"
    )
    (root / "sub" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "c.webp", "text": "nested", "uid": "C"}) + "\n"
    )
    return root


def test_images_in_sorted_relative_path_order_with_captions(folder):
    rows = rows_of(folder)
    assert [r.id for r in rows] == ["a.jpg", "b.png", "d.bmp", "sub/c.webp"]
    assert [r.index for r in rows] == [0, 1, 2, 3]
    assert [r.caption for r in rows] == ["from metadata", "a sidecar caption", None, "nested"]
    assert rows[3].path == str(folder / "sub" / "c.webp")
    assert all(r.url is None and r.data is None for r in rows)


def test_id_column_comes_from_metadata(folder):
    rows = rows_of(folder, id_column="uid")
    assert [r.id for r in rows] == ["A", "B", None, "C"]  # d.bmp has no metadata: no id


def test_explicit_caption_column_must_exist(folder):
    with pytest.raises(UserError, match="prompt"):
        rows_of(folder, caption_column="prompt")


def test_no_images_is_a_user_error_that_says_what_was_searched(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(UserError, match="No images found.*subfolders"):
        rows_of(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        rows_of(tmp_path / "absent")


def test_broken_metadata_is_a_user_error_with_line(folder):
    (folder / "metadata.jsonl").write_text('{"file_name": "a.jpg"}\n{broken\n')
    with pytest.raises(UserError, match="line 2"):
        rows_of(folder)


def test_fingerprint_changes_with_image_bytes_under_the_same_name(folder, make_image):
    config = SourceConfig(kind="folder", path=str(folder))
    before = sources.fingerprint(config)
    assert sources.fingerprint(config) == before
    image = folder / "a.jpg"
    stat = image.stat()
    image.write_bytes(make_image(fmt="JPEG", seed=9))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same name, same mtime
    edited = sources.fingerprint(config)
    assert edited != before
    (folder / "b.txt").write_text("another caption")
    assert sources.fingerprint(config) not in (before, edited)


def test_fingerprint_ignores_unrelated_files(folder):
    config = SourceConfig(kind="folder", path=str(folder))
    before = sources.fingerprint(config)
    (folder / "notes.md").write_text("edited notes")
    (folder / ".hidden.png").write_bytes(b"changed")
    assert sources.fingerprint(config) == before


@pytest.mark.timeout(60)  # reading a FIFO would block for ever
def test_fifos_and_symlinks_out_of_the_folder_fail_and_are_never_read(tmp_path, make_image):
    from tasks.download import download

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(make_image(seed=1))
    (outside / "secret.txt").write_text("a caption from outside")
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.png").write_bytes(make_image(seed=2))
    (root / "inner.png").symlink_to(root / "a.png")  # a link inside the folder is fine
    (root / "out.png").symlink_to(outside / "secret.png")
    (root / "inner.txt").symlink_to(outside / "secret.txt")  # caption file leading out: ignored
    os.mkfifo(root / "pipe.png")
    os.mkfifo(root / "a.txt")

    config = SourceConfig(kind="folder", path=str(root))
    before = sources.fingerprint(config)
    rows = rows_of(root)
    assert [(r.id, r.caption) for r in rows] == [
        ("a.png", None),
        ("inner.png", None),
        ("out.png", None),
        ("pipe.png", None),
    ]
    (outside / "secret.png").write_bytes(make_image(seed=3))
    assert sources.fingerprint(config) == before  # the outside file is not part of the source

    run = RunConfig.model_validate(
        {"source": config.model_dump(), "download": {"resolution": 16, "decode_workers": 1}}
    )
    manifest = download(run, {}, str(tmp_path / "work"))
    failures = read_failures(tmp_path / "work", manifest).to_pylist()
    assert {f["id"]: f["reason"] for f in failures} == {
        "out.png": "outside_source",
        "pipe.png": "not_a_regular_file",
    }
    assert manifest["counts"]["kept"] == 2


def test_a_folder_of_links_out_fails_whole_with_a_hint(tmp_path, make_image):
    from tasks.download import download

    (tmp_path / "secret.png").write_bytes(make_image())
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.png").symlink_to(tmp_path / "secret.png")
    config = RunConfig.model_validate({"source": {"kind": "folder", "path": str(root)}})
    with pytest.raises(UserError, match="outside_source x1.*inside the source directory"):
        download(config, {}, str(tmp_path / "work"))
