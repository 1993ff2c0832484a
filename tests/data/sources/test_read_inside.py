"""Local reads stay inside the source directory even when it changes under them
(sdflow.data.sources.read_inside)."""

from __future__ import annotations

import pytest

from sdflow.data import sources
from sdflow.data.imaging import Rejected


@pytest.fixture()
def swap(tmp_path, monkeypatch):
    """root/sub/img.png passes the check; right after it, `sub` becomes a symlink to a folder
    outside the root holding a secret of the same name (the race an attacker would win)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "img.png").write_bytes(b"inside")
    outside.mkdir()
    (outside / "img.png").write_bytes(b"SECRET")
    checked = sources.unsafe_reason

    def check_then_swap(base, path):
        reason = checked(base, path)
        (root / "sub").rename(tmp_path / "moved")
        (root / "sub").symlink_to(outside, target_is_directory=True)
        return reason

    monkeypatch.setattr(sources, "unsafe_reason", check_then_swap)
    return root


def test_a_directory_swapped_for_a_symlink_after_the_check_is_refused(swap):
    with pytest.raises(Rejected) as caught:
        sources.read_inside(str(swap / "sub" / "img.png"), str(swap), 1 << 20)
    assert caught.value.reason == "outside_source"


def test_an_unchanged_file_is_read(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.png").write_bytes(b"0123456789")
    assert sources.read_inside(str(tmp_path / "a" / "b" / "x.png"), str(tmp_path), 64) == (
        b"0123456789"
    )
    assert sources.read_inside(str(tmp_path / "a/b/x.png"), str(tmp_path), 64, (2, 3)) == b"234"
    with pytest.raises(Rejected, match="missing_file"):
        sources.read_inside(str(tmp_path / "a" / "nope.png"), str(tmp_path), 64)
