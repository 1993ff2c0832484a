"""The demo dataset: deterministic, balanced, captioned exactly, shapes really drawn, reused."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdflow.data.sources.demo import (
    BACKGROUNDS,
    COLORS,
    NEW_COLORS,
    SHAPES,
    make_demo_dataset,
    unseen_samples,
)
from sdflow.errors import UserError

CAPTION = re.compile(
    r"^a (red|green|blue|yellow) (circle|square|triangle) on a (white|black) background$"
)
ANY_CAPTION = re.compile(r"^a (\w+) (\w+) on a (white|black) background$")
# share of the shape's bounding box it fills: tells the shapes apart (a cross fills 5/9)
FILL_RANGE = {
    "square": (0.99, 1.0),
    "circle": (0.72, 0.83),
    "triangle": (0.45, 0.58),
    "cross": (0.48, 0.62),
}


def read_metadata(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def check_image(
    path: Path, caption: str, size: int, palette: dict = COLORS, min_fraction: float = 0.35
) -> int:
    """Exactly two colours (shape and background), the shape inside the image, sized as promised;
    returns the shape's larger side."""
    color, shape, background = ANY_CAPTION.match(caption).groups()
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape == (size, size, 3)
    colours = {tuple(int(v) for v in c) for c in np.unique(pixels.reshape(-1, 3), axis=0)}
    assert colours == {palette[color], BACKGROUNDS[background]}, (path, caption)
    ys, xs = np.nonzero((pixels == palette[color]).all(axis=2))
    assert xs.min() >= 1 and ys.min() >= 1 and xs.max() <= size - 2 and ys.max() <= size - 2
    width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    for side in (width, height):
        assert min_fraction * size - 1 <= side <= 0.80 * size + 1, (path, side)
    low, high = FILL_RANGE[shape]
    assert low <= len(xs) / (width * height) <= high, (path, shape, len(xs) / (width * height))
    return max(width, height)


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


def test_extra_shape_and_colour_join_every_combination(tmp_path: Path) -> None:
    purple = {"purple": NEW_COLORS["purple"]}
    root = make_demo_dataset(
        tmp_path / "ft", count=120, seed=1, size=32, extra_shapes=("cross",), extra_colors=purple
    )
    rows = read_metadata(root)
    combos = Counter(ANY_CAPTION.match(r["caption"]).groups() for r in rows)
    expected = {(c, s, b) for c in [*COLORS, "purple"] for s in [*SHAPES, "cross"] for b in "wb"}
    assert {(c, s, b[0]) for c, s, b in combos} == expected  # 5 colours x 4 shapes x 2 grounds
    assert set(combos.values()) == {3}
    for row in rows:
        check_image(root / row["file_name"], row["caption"], 32, {**COLORS, **purple})
    marker = json.loads((root / "demo.json").read_text())
    assert marker["extra_shapes"] == ["cross"] and marker["extra_colors"] == {
        "purple": [140, 40, 200]
    }
    # the default set is untouched by the option: same bytes as before extras existed
    plain = all_files(make_demo_dataset(tmp_path / "plain", count=24, seed=1, size=32))
    assert "extra_shapes" not in json.loads(plain["demo.json"])


def test_min_fraction_draws_only_large_shapes(tmp_path: Path) -> None:
    large = make_demo_dataset(tmp_path / "large", count=96, size=32, min_fraction=0.6)
    sides = [
        check_image(large / r["file_name"], r["caption"], 32, min_fraction=0.6)
        for r in read_metadata(large)
    ]
    assert min(sides) >= 0.6 * 32 - 1
    assert json.loads((large / "demo.json").read_text())["min_fraction"] == 0.6
    plain = make_demo_dataset(tmp_path / "plain", count=96, size=32)  # the default is smaller
    assert (
        min(check_image(plain / r["file_name"], r["caption"], 32) for r in read_metadata(plain))
        < 18
    )
    with pytest.raises(UserError, match="min_fraction is 0.9; it must be in"):
        make_demo_dataset(tmp_path / "x", count=8, min_fraction=0.9)


@pytest.mark.parametrize(
    ("extras", "message"),
    [
        ({"extra_shapes": ("star",)}, "extra_shapes has 'star'"),
        ({"extra_colors": {"red": (1, 2, 3)}}, "extra_colors has 'red'"),
        ({"extra_colors": {"dark violet": (1, 2, 3)}}, "one-word"),
        ({"extra_colors": {"violet": (1, 2, 300)}}, "three ints 0-255"),
    ],
)
def test_bad_extras_are_refused_before_writing(tmp_path: Path, extras, message) -> None:
    with pytest.raises(UserError, match=message):
        make_demo_dataset(tmp_path / "x", count=8, **extras)
    assert not (tmp_path / "x").exists()


def test_unseen_samples_show_only_what_the_default_set_lacks() -> None:
    for kind, allowed in (("colour", NEW_COLORS), ("shape", COLORS)):
        images = unseen_samples(kind, 12, 32)
        assert len(images) == 12
        fills = Counter()
        for image in images:
            pixels = np.asarray(image).reshape(-1, 3)
            colours = {tuple(int(v) for v in c) for c in np.unique(pixels, axis=0)}
            fill = colours - set(BACKGROUNDS.values())
            assert len(fill) == 1 and fill <= set(allowed.values()), (kind, colours)
            fills[fill.pop()] += 1
        assert len(fills) == len(allowed)  # every unseen colour, or the cross in every colour
    for image in unseen_samples("shape", 6, 64):  # a plus sign: centre filled, box corners not
        pixels = np.asarray(image)
        ground = pixels[0, 0]
        ys, xs = np.nonzero((pixels != ground).any(axis=2))
        box = pixels[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        filled = (box != ground).any(axis=2)
        low, high = FILL_RANGE["cross"]
        assert low <= filled.mean() <= high
        assert (
            filled[len(box) // 2, len(box) // 2]
            and not filled[[0, 0, -1, -1], [0, -1, 0, -1]].any()
        )
