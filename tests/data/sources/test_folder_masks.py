"""The folder source's `NAME.mask.png` files: masks of their images, never image rows, hashed
into the source's fingerprint."""

from __future__ import annotations

from fixtures.masks import masked_folder

from sdflow.config import SourceConfig
from sdflow.data.sources import folder


def test_mask_files_are_masks_of_their_images_not_images(tmp_path):
    root = masked_folder(tmp_path / "images")
    source = SourceConfig(kind="folder", path=str(root))
    layout = folder.scan(source)
    assert layout.images == ["alpha.png", "broken.png", "half.png", "plain.png", "wrong.png"]
    assert layout.masks == {
        n: n.replace(".png", ".mask.png") for n in ("broken.png", "half.png", "wrong.png")
    }
    rows = {row.id: row.mask for row in folder.open_rows(source).rows}
    assert rows["half.png"] == str(root / "half.mask.png") and rows["plain.png"] is None
    before = folder.fingerprint(source)
    (root / "half.mask.png").write_bytes((root / "wrong.mask.png").read_bytes())
    assert folder.fingerprint(source) != before  # an edited mask is a new source
