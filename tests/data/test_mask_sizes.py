"""`train.masked_loss` with a folder source: a mask file of another size than its image stops
`sdflow run` before any stage (issue 24, "Bad input"); an unreadable one is left to the download
stage, which fails that image's row."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from sdflow.cli import main
from sdflow.data.masks import mask_size_mismatches

EXIF_ORIENTATION = 0x0112


def write(folder: Path, name: str, size: tuple[int, int], mask: tuple[int, int] | None) -> None:
    Image.new("RGB", size, "red").save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text("red, square")
    if mask:
        Image.new("L", mask, 255).save(folder / f"{name}.mask.png")


def test_a_mask_of_another_size_stops_the_run_before_any_stage(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder, "good", (32, 24), (32, 24))
    write(folder, "wide", (32, 24), (24, 32))
    write(folder, "plain", (32, 32), None)
    (folder / "broken.png").write_bytes(b"")  # not an image: the download stage's failure row
    (folder / "broken.mask.png").write_bytes(b"not a png")
    workdir = tmp_path / "work"
    sets = ["--set", f"source.path={folder}", "--set", "train.masked_loss=true"]
    assert main(["run", "tiny-test", "--workdir", str(workdir), *sets]) == 2
    error = capsys.readouterr().err
    assert "1 mask file(s)" in error and "wide.png: mask 24x32, image 32x24" in error
    assert not (workdir / "stages").exists()


def test_sizes_are_compared_upright(tmp_path):
    """A photo stored sideways with an EXIF rotation is compared as it is shown (and resized)."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # turned 90 degrees: stored 24x32, shown 32x24
    Image.new("RGB", (24, 32), "red").save(tmp_path / "photo.jpg", exif=exif)
    Image.new("L", (32, 24), 255).save(tmp_path / "photo.mask.png")
    Image.new("L", (24, 32), 255).save(tmp_path / "stored.mask.png")
    photo = tmp_path / "photo.jpg"
    assert mask_size_mismatches([(photo, tmp_path / "photo.mask.png")]) == []
    assert mask_size_mismatches([(photo, tmp_path / "stored.mask.png")]) == [
        "photo.jpg: mask 24x32, image 32x24"
    ]
