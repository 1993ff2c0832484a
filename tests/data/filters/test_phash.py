"""Near-duplicates by perceptual hash (`sdflow.data.filters.phash`): across shards, the band index
against a full scan, incremental hashing and resume."""

from __future__ import annotations

import random
from pathlib import Path

import imagehash
import pytest
from fixtures.filtering import (
    crash_on_second_shard,
    curation_config,
    encoded,
    fates,
    make_config,
    picture,
    sample,
    variant,
)
from fixtures.stages import fresh_fingerprint, write_stage

import tasks.filter as filter_stage
from sdflow.data.filters.phash import NearDuplicates
from sdflow.store.stageio import read_failures
from tasks.filter import filter_samples

IMAGES = {
    "p0": picture(0),
    "v1": variant(picture(1)),
    "x2": picture(2),
    "p1": picture(1),
    "v0": variant(picture(0)),
    "x3": picture(3),
}
NEAR_SHARDS = [
    [sample(s, (i, 9, 9), data=encoded(IMAGES[s])) for i, s in enumerate(["p0", "v1", "x2"])],
    [
        *(sample(s, (i, 8, 8), data=encoded(IMAGES[s])) for i, s in enumerate(["p1", "v0", "x3"])),
        sample("x2-copy", (2, 9, 9), data=encoded(IMAGES["x2"])),  # same content hash as x2
    ],
]


def distance(a: str, b: str) -> int:
    return int(imagehash.phash(IMAGES[a]) - imagehash.phash(IMAGES[b]))


@pytest.mark.parametrize("near", [1, 2])
def test_near_duplicates_across_shards_keep_the_first(tmp_path: Path, near: int) -> None:
    d_p1, d_v0 = distance("p1", "v1"), distance("v0", "p0")
    assert d_p1 <= 1 < d_v0 <= 2  # the images straddle the two settings
    assert min(distance(a, b) for a, b in [("p0", "x2"), ("p0", "x3"), ("v1", "x3")]) > 16
    download = write_stage(tmp_path, "download", NEAR_SHARDS)
    manifest = filter_samples(
        curation_config(near_dup_distance=near), {"download": download}, str(tmp_path)
    )
    expected = {s: "kept" for s in IMAGES}
    expected |= {"p1": "near_duplicate", "x2-copy": "duplicate"}
    if near == 2:
        expected["v0"] = "near_duplicate"
    assert fates(tmp_path, manifest) == expected
    details = {f["id"]: f["detail"] for f in read_failures(tmp_path, manifest).to_pylist()}
    assert details["p1"] == f"v1 at Hamming distance {d_p1}"  # v1 came first in dataset order
    if near == 2:
        assert details["v0"] == f"p0 at Hamming distance {d_v0}"
    assert manifest["counts"]["failed_by_reason"]["near_duplicate"] == 1 + (near == 2)


def test_near_duplicates_off_by_default(tmp_path: Path) -> None:
    download = write_stage(tmp_path, "download", NEAR_SHARDS)
    manifest = filter_samples(make_config(), {"download": download}, str(tmp_path))
    assert fates(tmp_path, manifest) == {**dict.fromkeys(IMAGES, "kept"), "x2-copy": "duplicate"}


def brute_force(hashes: list[int], limit: int) -> dict[int, tuple[int, int]]:
    """Reference: row -> (kept twin, distance) by scanning every kept row."""
    kept: list[int] = []
    rejected = {}
    for row, value in enumerate(hashes):
        near = [(bin(value ^ hashes[k]).count("1"), k) for k in kept]
        near = [pair for pair in near if pair[0] <= limit]
        if near:
            d, twin = min(near)
            rejected[row] = (twin, d)
        else:
            kept.append(row)
    return rejected


@pytest.mark.parametrize("limit", [0, 3, 8, 16])
def test_band_index_finds_what_a_full_scan_finds(limit: int) -> None:
    rng = random.Random(limit)
    hashes = [rng.getrandbits(64) for _ in range(300)]
    for _ in range(300):  # near copies of earlier hashes, 0..limit+2 bits flipped
        value = rng.choice(hashes)
        for bit in rng.sample(range(64), rng.randrange(limit + 3)):
            value ^= 1 << bit
        hashes.append(value)
    index, got = NearDuplicates(limit), {}
    for row, value in enumerate(hashes):
        twin = index.twin(f"{value:016x}")
        if twin is None:
            index.add(f"{value:016x}", str(row))
        else:
            got[row] = (int(twin[0]), twin[1])
    expected = brute_force(hashes, limit)
    assert got == expected and 50 < len(expected) < 300


def counting(monkeypatch: pytest.MonkeyPatch, name: str, calls: list[str], by_id: dict) -> None:
    """Count calls of tasks.filter's `name`, by the id of the image bytes' row."""
    real = getattr(filter_stage, name)

    def counted(arg):
        calls.append(by_id[arg] if isinstance(arg, bytes) else arg["id"])
        return real(arg)

    monkeypatch.setattr(filter_stage, name, counted)


def test_grown_dataset_hashes_only_new_rows_and_a_new_distance_hashes_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grown_images = {**IMAGES, "v3": variant(picture(3)), "x4": picture(4)}
    grown = [
        *NEAR_SHARDS,
        [sample(s, (i, 7, 7), data=encoded(grown_images[s])) for i, s in enumerate(["v3", "x4"])],
    ]
    by_id = {row["image"]: row["id"] for shard in grown for row in shard}
    decoded, hashed = [], []
    counting(monkeypatch, "check_decodes", decoded, by_id)
    counting(monkeypatch, "phash_hex", hashed, by_id)
    nightly = tmp_path / "nightly"
    up = {"download": write_stage(nightly, "download", NEAR_SHARDS, "n1")}
    filter_samples(curation_config(near_dup_distance=2), up, str(nightly))
    assert len(hashed) == 7  # every row that passes the per-row checks, the exact duplicate too
    decoded.clear(), hashed.clear()

    up = {"download": write_stage(nightly, "download", grown, "n2")}
    incremental = filter_samples(curation_config(near_dup_distance=2), up, str(nightly))
    assert sorted(decoded) == sorted(hashed) == ["v3", "x4"]
    d_v3 = int(imagehash.phash(grown_images["v3"]) - imagehash.phash(IMAGES["x3"]))
    assert fates(nightly, incremental)["v3"] == "near_duplicate" and d_v3 <= 2
    failures = {f["id"]: f["detail"] for f in read_failures(nightly, incremental).to_pylist()}
    assert failures["v3"] == f"x3 at Hamming distance {d_v3}"

    scratch = tmp_path / "scratch"
    fresh = filter_samples(
        curation_config(near_dup_distance=2),
        {"download": write_stage(scratch, "download", grown, "n2")},
        str(scratch),
    )
    assert incremental["fingerprint"] == fresh["fingerprint"]

    decoded.clear(), hashed.clear()
    looser = filter_samples(curation_config(near_dup_distance=1), up, str(nightly))
    assert decoded == hashed == []  # the distance is a setting of the dataset pass only
    assert fates(nightly, looser)["v0"] == "kept"  # 2 bits from p0


def test_resume_keeps_the_finished_shards_perceptual_hashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = curation_config(near_dup_distance=2)
    up = {"download": write_stage(tmp_path, "download", NEAR_SHARDS)}
    calls = crash_on_second_shard(monkeypatch)
    with pytest.raises(RuntimeError, match="killed"):
        filter_samples(config, up, str(tmp_path))
    manifest = filter_samples(config, up, str(tmp_path))
    assert len(calls) == 3  # shard 0 was not filtered again
    got = fates(tmp_path, manifest)
    assert got["p1"] == got["v0"] == "near_duplicate"  # twins in the shard kept from before
    rebuild = lambda: filter_samples(config, up, str(tmp_path))  # noqa: E731
    assert fresh_fingerprint(tmp_path, manifest, rebuild) == manifest["fingerprint"]
