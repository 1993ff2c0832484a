"""Metadata thresholds of the filter stage (`sdflow.data.filters.metadata`): LAION-style fields
rejected with their value, missing fields, the key, bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures.filtering import (
    curation_config,
    fates,
    make_config,
    sample,
)
from fixtures.stages import write_stage
from pydantic import ValidationError

from sdflow.config import RunConfig
from sdflow.store.stageio import read_failures
from tasks.filter import filter_key, filter_samples


def with_metadata(row: dict, fields: dict | None) -> dict:
    return {**row, "metadata": None if fields is None else json.dumps(fields, sort_keys=True)}


def laion(sid: str, color: tuple, **fields) -> dict:
    return with_metadata(sample(sid, color), fields)


METADATA_ROWS = [
    [
        laion("m0", (10, 0, 0), similarity=0.31, pwatermark=0.1, punsafe=0.1),
        laion("m1", (20, 0, 0), similarity=0.2, pwatermark=0.1, punsafe=0.1),
        laion("m2", (30, 0, 0), similarity=0.35, pwatermark=0.9, punsafe=0.1),
        laion("m3", (40, 0, 0), similarity=0.28, pwatermark=0.5, punsafe=0.5),  # bounds included
    ],
    [
        with_metadata(sample("m4", (50, 0, 0)), None),  # a source without metadata
        laion("m5", (60, 0, 0), similarity="n/a", pwatermark=0.1, punsafe=0.1),
        laion("m6", (70, 0, 0), similarity=0.4, pwatermark=0.2),  # no punsafe
        laion("m7", (80, 0, 0), similarity=0.4, pwatermark=0.2, punsafe=0.7),
    ],
]
LAION_FILTER = {
    "similarity": {"min": 0.28},
    "pwatermark": {"max": 0.5},
    "punsafe": {"max": 0.5},
}


def metadata_config(missing: str = "keep") -> RunConfig:
    return curation_config(metadata=LAION_FILTER, metadata_missing=missing)


def test_metadata_thresholds_reject_with_the_value(tmp_path: Path) -> None:
    download = write_stage(tmp_path, "download", METADATA_ROWS)
    manifest = filter_samples(metadata_config(), {"download": download}, str(tmp_path))
    assert fates(tmp_path, manifest) == {
        "m0": "kept",
        "m1": "metadata:similarity",
        "m2": "metadata:pwatermark",
        "m3": "kept",
        "m4": "kept",  # missing: keep (the default)
        "m5": "kept",  # the unreadable similarity counts as missing: kept
        "m6": "kept",
        "m7": "metadata:punsafe",
    }
    details = {f["id"]: f["detail"] for f in read_failures(tmp_path, manifest).to_pylist()}
    assert details == {
        "m1": "similarity=0.2 < min 0.28",
        "m2": "pwatermark=0.9 > max 0.5",
        "m7": "punsafe=0.7 > max 0.5",
    }


def test_rows_missing_a_field_can_be_rejected(tmp_path: Path) -> None:
    download = write_stage(tmp_path, "download", METADATA_ROWS)
    manifest = filter_samples(metadata_config("reject"), {"download": download}, str(tmp_path))
    got = fates(tmp_path, manifest)
    assert {k: got[k] for k in ("m0", "m4", "m5", "m6", "m7")} == {
        "m0": "kept",
        "m7": "metadata:punsafe",
        "m4": "metadata_missing:punsafe",  # fields are checked in name order
        "m5": "metadata_missing:similarity",
        "m6": "metadata_missing:punsafe",
    }
    details = {f["id"]: f["detail"] for f in read_failures(tmp_path, manifest).to_pylist()}
    assert details["m4"] == "absent" and details["m5"] == "not a number: 'n/a'"


def test_metadata_thresholds_are_in_the_key(tmp_path: Path) -> None:
    up = {"download": write_stage(tmp_path, "download", METADATA_ROWS)}
    key = filter_key(metadata_config(), up)
    assert filter_key(make_config(), up) != key
    assert filter_key(metadata_config("reject"), up) != key
    stricter = metadata_config()
    stricter.filter.metadata["similarity"].min = 0.3
    assert filter_key(stricter, up) != key


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"metadata": {"similarity": {}}}, "give min, max or both"),
        ({"metadata": {"punsafe": {"min": 0.6, "max": 0.5}}}, r"min \(0.6\) must not exceed"),
        ({"metadata": {"punsafe": {"maximum": 0.5}}}, "maximum"),
        ({"metadata": {"punsafe": {"max": "high"}}}, "high"),
        ({"metadata_missing": "drop"}, "'keep' or 'reject'"),
        ({"near_dup_distance": 40}, "less than or equal to 16"),
        ({"classifiers": [{"model": "m", "label": "nsfw", "max": 1.5}]}, "less than or equal to 1"),
        ({"classifiers": [{"model": "m", "label": "nsfw"}]}, "give min, max or both"),
        ({"classifiers": [{"label": "nsfw", "max": 0.5}]}, "model"),
        ({"clip_score": {"min": 0.28}}, "clip_score needs filter.clip_model"),
        ({"clip_model": "m", "aesthetic": {"min": 5}}, "weights"),
    ],
)
def test_bad_filter_settings_name_key_and_value(section: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        RunConfig(source={"kind": "folder", "path": "x"}, filter=section)
    assert "filter." in str(info.value)
