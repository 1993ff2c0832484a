"""Bounded tar headers and brace ranges for WebDataset shards (sdflow.data.sources.tarbounds)."""

from __future__ import annotations

import io
import tarfile
import time
import tracemalloc

import pytest
from braceexpand import braceexpand
from fixtures.shards import write_tar, write_tar_after_header

from sdflow.config import SourceConfig
from sdflow.data.sources import tarbounds, webdataset
from sdflow.errors import UserError

SAMPLES = [("000", {"jpg": b"\xff\xd8 not decoded here", "txt": "a cube"})]


def keys(shard) -> list[str]:
    return [key for key, _ in webdataset.samples(shard)]


@pytest.mark.parametrize("typeflag", [b"L", b"x"], ids=["gnu-long-name", "pax"])
def test_a_200_mb_extension_header_is_refused_unread(tmp_path, typeflag):
    shard = write_tar_after_header(tmp_path / "big.tar", typeflag, 200 << 20, None, SAMPLES)
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match="declares 209715200 bytes"):
            keys(shard)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # tarfile would have read the whole header: 200 MB


def test_a_quadratic_pax_header_is_refused_quickly(tmp_path):
    """CVE-2024-6232's shape: a pax header of digits (64 KiB: 18 s in tarfile on Python 3.11.7)."""
    shard = write_tar_after_header(tmp_path / "cve.tar", b"x", 16 << 10, b"1" * (16 << 10), SAMPLES)
    started = time.perf_counter()
    with pytest.raises(UserError, match="more than 64 digits"):
        keys(shard)
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize(
    "payload",
    [b"30 path=000.jpg\n", b"99 path=000.jpg\n", b"16 path000.jpg\n\n", b"27 GNU.sparse.major=1\n"],
    ids=["length-too-long", "past-the-end", "no-equals", "sparse"],
)
def test_malformed_or_sparse_pax_records_are_refused(tmp_path, payload):
    shard = write_tar_after_header(tmp_path / "bad.tar", b"x", len(payload), payload, SAMPLES)
    with pytest.raises(UserError, match="pax header"):
        keys(shard)


def test_pax_headers_as_webdataset_writes_them_are_read(tmp_path):
    """webdataset's writer gives every member a float mtime, which tarfile stores as a pax
    record; non-ASCII names get one too. Both shards read as tarfile itself reads them."""
    shard = tmp_path / "pax.tar"
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("k\u00e9y.jpg", b"\xff\xd8"), ("k\u00e9y.txt", b"caption")]:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1700000000.25
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(shard) as tar:
        assert all(m.pax_headers for m in tar.getmembers())  # the hard path happens
    assert [(k, m["txt"]) for k, m in webdataset.samples(shard)] == [("k\u00e9y", "caption")]
    assert keys(write_tar(tmp_path / "plain.tar", SAMPLES)) == ["000"]


@pytest.mark.parametrize(
    "pattern",
    [
        "d/{00000..00099}.tar",
        "d/{0..20..3}/{a,b{1..4},c}.tar",
        "{a..f..2}{x,}{,{1,2}}",
        "plain.tar",
        "d/{x}.tar",
        r"d/\{0..9\}.tar",
        "{Z..a}{z..A..5}",
        "{9..-3}{,}",
    ],
)
def test_brace_count_matches_braceexpand(pattern):
    assert tarbounds.brace_count(pattern) == len(list(braceexpand(pattern)))


def test_a_huge_brace_range_is_refused_before_expanding(tmp_path):
    source = SourceConfig(kind="webdataset", path=str(tmp_path / "{0..999999999}.tar"))
    started = time.perf_counter()
    with pytest.raises(UserError, match="expands to 1000000000 names"):
        webdataset.shard_paths(source)
    assert time.perf_counter() - started < 0.5
