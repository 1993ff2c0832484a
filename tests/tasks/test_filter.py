"""Filter stage on a hand-made download output: every sample's fate, resume, keys, caption rules."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from fixtures.filtering import fates, make_config, png, sample
from fixtures.stages import crash_on_second_call, fresh_fingerprint, write_stage
from PIL import Image

import tasks.filter as filter_stage
from sdflow.data.sources import SAMPLE_SCHEMA
from sdflow.errors import UserError
from sdflow.store.stageio import Manifest, read_failures, read_shards, shard_paths
from tasks.filter import check_decodes, filter_key, filter_samples

SCHEMA = SAMPLE_SCHEMA  # the download / filter / caption shard schema


RED, GREEN, BLUE, YELLOW, GREY, PINK = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (90, 90, 90),
    (255, 0, 255),
)
SHARDS = [
    [
        sample("s00", RED),
        sample("s01", RED, "another caption for it"),  # same content as s00
        sample("s02", GREY, data=png(GREY)[:60]),  # truncated file
        sample("s03", BLUE, orig=(8, 12)),  # stored at 32 px, but tiny originally
        sample("s04", YELLOW, orig=(300, 60)),  # centre-cropped, but 5:1 originally
        sample("s05", GREEN, None),
    ],
    [
        sample("s06", RED),  # duplicate across shards
        sample("s07", (1, 2, 3), " \t\n "),
        sample("s08", (4, 5, 6), "cat"),
        sample("s09", (7, 8, 9), "word " * 20),
        sample("s10", GREEN, "same picture as s05, which had no caption"),
        sample("s11", PINK, "  a pink   square\non grey "),
    ],
    [],  # an empty input shard still gets its (empty) output shard
]
FATES = {
    "s00": "kept",
    "s01": "duplicate",
    "s02": "decode_error",
    "s03": "too_small",
    "s04": "aspect_ratio",
    "s05": "missing_caption",
    "s06": "duplicate",
    "s07": "missing_caption",
    "s08": "caption_too_short",
    "s09": "caption_too_long",
    "s10": "kept",
    "s11": "kept",
}


@pytest.fixture
def download(tmp_path: Path) -> Manifest:
    return write_stage(tmp_path, "download", SHARDS)


def test_every_sample_has_its_fate(tmp_path: Path, download: Manifest) -> None:
    manifest = filter_samples(make_config(), {"download": download}, str(tmp_path))
    assert fates(tmp_path, manifest) == FATES
    failures = {f["id"]: f for f in read_failures(tmp_path, manifest).to_pylist()}
    assert failures["s01"]["detail"] == "s00" and failures["s06"]["detail"] == "s00"
    assert failures["s02"]["source"] == "/data/s02.png"
    assert "300x60" in failures["s04"]["detail"]
    counts = manifest["counts"]
    assert counts["input"] == 12 and counts["kept"] == 3 and counts["failed"] == 9
    assert counts["kept"] + counts["failed"] == counts["input"]
    assert counts["failed_by_reason"] == {
        "duplicate": 2,
        "decode_error": 1,
        "too_small": 1,
        "aspect_ratio": 1,
        "missing_caption": 2,
        "caption_too_short": 1,
        "caption_too_long": 1,
    }
    assert manifest["files"] == {"failures": "failures"}


def test_kept_rows_are_copied_unchanged(tmp_path: Path, download: Manifest) -> None:
    manifest = filter_samples(make_config(), {"download": download}, str(tmp_path))
    inputs = {r["id"]: r for rows in SHARDS for r in rows}
    outputs = list(read_shards(tmp_path, manifest))
    assert len(outputs) == len(shard_paths(tmp_path, download)) == 3
    assert [t.num_rows for t in outputs] == [1, 2, 0]
    for table in outputs:
        assert table.schema.equals(SCHEMA)
        for row in table.to_pylist():
            assert row == {"metadata": None, **inputs[row["id"]]}  # as they came, not re-encoded


def test_template_captions_turn_caption_rules_off(tmp_path: Path, download: Manifest) -> None:
    config = make_config(on_missing="template")
    manifest = filter_samples(config, {"download": download}, str(tmp_path))
    expected = {**FATES, "s05": "kept", "s07": "kept", "s08": "kept", "s09": "kept"}
    expected["s10"] = "duplicate"  # its twin s05 is kept now
    assert fates(tmp_path, manifest) == expected
    assert manifest["info"]["caption_rules"] is False


def test_dedup_can_be_switched_off(tmp_path: Path, download: Manifest) -> None:
    config = make_config()
    config.filter.dedup = False
    manifest = filter_samples(config, {"download": download}, str(tmp_path))
    assert fates(tmp_path, manifest) == {**FATES, "s01": "kept", "s06": "kept"}


def test_resume_keeps_finished_shards_and_their_hashes(
    tmp_path: Path, download: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config()
    calls = crash_on_second_call(monkeypatch, filter_stage, "filter_shard")
    with pytest.raises(RuntimeError, match="killed"):
        filter_samples(config, {"download": download}, str(tmp_path))
    key = filter_key(config, {"download": download})
    partial = tmp_path / "stages" / "filter" / f".{key}.partial"
    assert sorted(p.name for p in partial.glob("*.parquet")) == ["shard-00000.parquet"]
    before = (partial / "shard-00000.parquet").stat()

    manifest = filter_samples(config, {"download": download}, str(tmp_path))
    after = (tmp_path / manifest["path"] / "shard-00000.parquet").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(calls) == 4  # shard 0 once; shard 1 crashed, then done; shard 2 (empty)
    assert fates(tmp_path, manifest) == FATES  # s06 still a duplicate of s00 from the kept shard
    assert manifest["counts"]["input"] == 12 and manifest["counts"]["failed"] == 9
    assert not partial.exists()
    assert manifest["info"]["shards_timed"] == 2  # the checks of shards 1 and 2 ran in this build
    assert 0 < manifest["info"]["shard_busy_seconds"] <= manifest["seconds"]
    rebuild = lambda: filter_samples(config, {"download": download}, str(tmp_path))  # noqa: E731
    assert fresh_fingerprint(tmp_path, manifest, rebuild) == manifest["fingerprint"]


def test_finished_output_is_reused(tmp_path: Path, download: Manifest) -> None:
    first = filter_samples(make_config(), {"download": download}, str(tmp_path))
    second = filter_samples(make_config(), {"download": download}, str(tmp_path))
    assert first["reused"] is False and second["reused"] is True
    assert second["fingerprint"] == first["fingerprint"]


def test_key_follows_settings_that_matter(tmp_path: Path, download: Manifest) -> None:
    up = {"download": download}
    base = make_config()
    key = filter_key(base, up)
    assert filter_key(make_config(), up) == key
    for section, field, value in [
        ("filter", "min_size", 20),
        ("filter", "max_aspect_ratio", 2.0),
        ("filter", "dedup", False),
        ("filter", "min_caption_words", 3),
        ("caption", "on_missing", "template"),
    ]:
        changed = make_config()
        setattr(getattr(changed, section), field, value)
        assert filter_key(changed, up) != key, field
    other = write_stage(tmp_path, "download", SHARDS[:1], key="other")
    assert filter_key(base, {"download": other}) != key
    # with template captions the filter ignores the caption rules, so they leave its key alone
    templated = make_config(on_missing="template")
    looser = make_config(on_missing="template")
    looser.filter.min_caption_words = 5
    assert filter_key(templated, up) == filter_key(looser, up)
    assert filter_key(make_config(prefix="sks, "), up) == key  # caption text is not its business


def test_nothing_left_is_a_user_error(tmp_path: Path, download: Manifest) -> None:
    config = make_config()
    config.filter.min_size = 5000
    with pytest.raises(UserError, match="kept none of the 12 .*too_small: 11, decode_error: 1"):
        filter_samples(config, {"download": download}, str(tmp_path))


def noise_png() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", png(RED)[:40], noise_png()[:3000], noise_png()[:-100]],
)
def test_broken_bytes_fail_the_decode_check(data: bytes) -> None:
    rejection = check_decodes({"image": data})
    assert rejection is not None and rejection.reason == "decode_error"
    assert check_decodes({"image": png(RED)}) is None


def test_a_grown_dataset_decodes_only_its_new_and_changed_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[str] = []
    real = filter_stage.check_decodes
    monkeypatch.setattr(
        filter_stage, "check_decodes", lambda row: decoded.append(row["id"]) or real(row)
    )
    config = make_config()
    nightly = tmp_path / "nightly"
    filter_samples(
        config, {"download": write_stage(nightly, "download", SHARDS, "n1")}, str(nightly)
    )
    assert len(decoded) == 12

    grown = [list(SHARDS[0]), [*SHARDS[1], sample("s12", (3, 3, 3)), sample("s13", RED)], []]
    grown[0][3] = sample("s03", BLUE, orig=(80, 80))  # re-downloaded larger: passes now
    decoded.clear()
    second = write_stage(nightly, "download", grown, "n2")
    incremental = filter_samples(config, {"download": second}, str(nightly))
    assert sorted(decoded) == ["s03", "s12", "s13"]  # failures before the decode check included
    assert fates(nightly, incremental) == {
        **FATES,
        "s03": "kept",
        "s12": "kept",
        "s13": "duplicate",
    }

    scratch = tmp_path / "scratch"
    fresh = filter_samples(
        config, {"download": write_stage(scratch, "download", grown, "n2")}, str(scratch)
    )
    assert incremental["fingerprint"] == fresh["fingerprint"]
