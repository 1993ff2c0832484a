"""The demo dataset: deterministic, balanced, captioned exactly, shapes really drawn, reused."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdflow.errors import UserError
from sdflow.sources.demo import BACKGROUNDS, COLORS, SHAPES, make_demo_dataset

CAPTION = re.compile(
    r"^a (red|green|blue|yellow) (circle|square|triangle) on a (white|black) background$"
)
# share of the shape's bounding box it fills: tells the three shapes apart
FILL_RANGE = {"square": (0.99, 1.0), "circle": (0.72, 0.83), "triangle": (0.45, 0.58)}


def read_metadata(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def check_image(path: Path, caption: str, size: int) -> None:
    """Exactly two colours (shape and background), the shape inside the image, sized as promised."""
    color, shape, background = CAPTION.match(caption).groups()
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape == (size, size, 3)
    colours = {tuple(int(v) for v in c) for c in np.unique(pixels.reshape(-1, 3), axis=0)}
    assert colours == {COLORS[color], BACKGROUNDS[background]}, (path, caption)
    ys, xs = np.nonzero((pixels == COLORS[color]).all(axis=2))
    assert xs.min() >= 1 and ys.min() >= 1 and xs.max() <= size - 2 and ys.max() <= size - 2
    width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    for side in (width, height):
        assert 0.35 * size - 1 <= side <= 0.80 * size + 1, (path, side)
    low, high = FILL_RANGE[shape]
    assert low <= len(xs) / (width * height) <= high, (path, shape, len(xs) / (width * height))


def test_default_dataset_is_balanced_and_drawn_as_captioned(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "demo")
    rows = read_metadata(root)
    assert root == tmp_path / "demo" and len(rows) == 2400
    assert sorted(p.name for p in root.iterdir()) == ["demo.json", "images", "metadata.jsonl"]
    assert len(list((root / "images").glob("*.png"))) == 2400
    assert len({r["file_name"] for r in rows}) == 2400
    assert all(CAPTION.match(r["caption"]) for r in rows)
    combos = Counter(r["caption"] for r in rows)
    assert len(combos) == len(SHAPES) * len(COLORS) * len(BACKGROUNDS)
    assert set(combos.values()) == {100}
    images = {(root / r["file_name"]).read_bytes() for r in rows}
    assert len(images) == 2400  # no exact duplicates for the filter to drop
    for row in rows[::7]:  # a spread-out subset keeps the test fast
        check_image(root / row["file_name"], row["caption"], 64)


def test_small_count_size_and_balance(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "d", count=50, seed=4, size=32)
    rows = read_metadata(root)
    counts = Counter(r["caption"] for r in rows)
    assert len(rows) == 50 and len(counts) == 24 and set(counts.values()) == {2, 3}
    for row in rows:
        check_image(root / row["file_name"], row["caption"], 32)


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    first = all_files(make_demo_dataset(tmp_path / "a", count=48, seed=3))
    second = all_files(make_demo_dataset(tmp_path / "b", count=48, seed=3))
    other = all_files(make_demo_dataset(tmp_path / "c", count=48, seed=4))
    assert first == second
    assert first.keys() == other.keys()
    assert first["metadata.jsonl"] != other["metadata.jsonl"]
    assert sum(first[name] != other[name] for name in first) > 40


def test_complete_dataset_is_reused_and_other_params_regenerate(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "demo", count=30)
    marker, image = (root / "demo.json").stat(), (root / "images" / "00000.png").stat()
    assert make_demo_dataset(tmp_path / "demo", count=30) == root
    for before, path in ((marker, root / "demo.json"), (image, root / "images" / "00000.png")):
        after = path.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    make_demo_dataset(tmp_path / "demo", count=36)
    assert len(read_metadata(root)) == 36
    assert json.loads((root / "demo.json").read_text())["count"] == 36
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temp or old siblings left


def test_stale_marker_is_regenerated(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "demo", count=24)
    (root / "demo.json").write_text("{}")  # an older generator's marker: ours, so replaceable
    make_demo_dataset(tmp_path / "demo", count=24)
    assert json.loads((root / "demo.json").read_text())["count"] == 24


def test_foreign_directory_is_left_untouched(tmp_path: Path) -> None:
    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(UserError, match="not an sdflow demo dataset"):
        make_demo_dataset(target, count=10)
    assert [p.name for p in target.iterdir()] == ["holiday.jpg"]


def test_empty_directory_is_filled(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert len(read_metadata(make_demo_dataset(tmp_path / "empty", count=12))) == 12


def test_loads_as_hf_imagefolder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    root = make_demo_dataset(tmp_path / "demo", count=24)
    ds = datasets.load_dataset(
        "imagefolder", data_dir=str(root), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert ds.num_rows == 24
    assert ds[0]["caption"] == read_metadata(root)[0]["caption"]
    assert ds[0]["image"].size == (64, 64)
