"""Curation filters of the filter stage (`sdflow.data.filters`): metadata thresholds, near-duplicates by
perceptual hash, image classifiers; their rejections, their settings, and incremental reuse."""

from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fixtures.clip import pair_cosines
from fixtures.filtering import fates, make_config, sample
from fixtures.stages import crash_on_second_call, fresh_fingerprint, write_stage
from PIL import Image, ImageDraw, ImageEnhance
from pydantic import ValidationError
from safetensors.numpy import save_file
from transformers import (
    CLIPModel,
    CLIPProcessor,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

import tasks.filter as filter_stage
from sdflow.config import Bounds, RunConfig
from sdflow.data.filters import Rejection
from sdflow.data.filters.clip import check_clip_score
from sdflow.data.filters.phash import NearDuplicates
from sdflow.data.filters.semantic import SemanticDuplicates, fit_centroids
from sdflow.errors import UserError
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


def curation_config(**filters) -> RunConfig:
    """`make_config`'s settings plus the given filter keys."""
    settings = make_config().model_dump(include={"source", "filter", "caption"})
    return RunConfig.model_validate({**settings, "filter": {**settings["filter"], **filters}})


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


# ------------------------------------------------------------------------------ near-duplicates


def picture(seed: int, size: int = 64) -> Image.Image:
    """Random rectangles on a random background: distinct seeds are far apart in pHash."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.randrange(size), rng.randrange(size)
        box = [x0, y0, x0 + rng.randrange(8, 32), y0 + rng.randrange(8, 32)]
        draw.rectangle(box, fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def variant(image: Image.Image) -> Image.Image:
    """Brighter and JPEG-compressed: a near-duplicate."""
    buf = io.BytesIO()
    ImageEnhance.Brightness(image).enhance(1.1).save(buf, "JPEG", quality=60)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def encoded(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


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


def crash_on_second_shard(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The filter stage dies writing its second shard (once); returns the list of calls."""
    return crash_on_second_call(monkeypatch, filter_stage, "filter_shard")


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


# ---------------------------------------------------------------------------- image classifiers


def save_classifier(directory: Path, seed: int) -> Path:
    """A tiny random-init ViT classifier with labels safe / nsfw, saved with its processor."""
    torch.manual_seed(seed)
    labels = {0: "safe", 1: "nsfw"}
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.mul_(4)  # spread the probabilities out
    model.save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def nsfw_probability(directory: Path, images: list[Image.Image]) -> list[float]:
    """Reference: the model run by hand, softmax over its two labels."""
    model = ViTForImageClassification.from_pretrained(directory).eval()
    pixels = ViTImageProcessor.from_pretrained(directory)(images, return_tensors="pt")
    with torch.no_grad():
        logits = model(**pixels).logits
    return torch.softmax(logits, dim=-1)[:, model.config.label2id["nsfw"]].tolist()


CLASSIFIED = {f"c{i}": picture(100 + i) for i in range(8)}
CLASSIFIED_SHARDS = [
    [sample(s, (i, 6, 6), data=encoded(CLASSIFIED[s])) for i, s in enumerate(CLASSIFIED) if i < 5],
    [sample(s, (i, 6, 6), data=encoded(CLASSIFIED[s])) for i, s in enumerate(CLASSIFIED) if i >= 5],
]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_classifier(tmp_path_factory.mktemp("vit"), seed=0)


@pytest.mark.parametrize("bound", ["max", "min"])
def test_classifier_rejects_by_probability(
    tmp_path: Path, classifier_dir: Path, bound: str, one_torch_thread
) -> None:
    expected = dict(
        zip(CLASSIFIED, nsfw_probability(classifier_dir, list(CLASSIFIED.values())), strict=True)
    )
    ordered = sorted(expected.values())
    threshold = (ordered[3] + ordered[4]) / 2  # four on each side
    assert ordered[4] - ordered[3] > 1e-3 and ordered[-1] - ordered[0] > 0.05
    spec = {"model": str(classifier_dir), "label": "nsfw", bound: threshold, "batch_size": 3}
    download = write_stage(tmp_path, "download", CLASSIFIED_SHARDS)
    manifest = filter_samples(
        curation_config(classifiers=[spec]), {"download": download}, str(tmp_path)
    )
    out = (lambda p: p > threshold) if bound == "max" else (lambda p: p < threshold)
    assert fates(tmp_path, manifest) == {
        s: "classifier:nsfw" if out(p) else "kept" for s, p in expected.items()
    }
    for failure in read_failures(tmp_path, manifest).to_pylist():
        shown = re.fullmatch(
            rf"nsfw=([0-9.]+) [<>] {bound} {threshold:g} \({classifier_dir}\)",
            failure["detail"],
        )
        assert shown and float(shown[1]) == pytest.approx(expected[failure["id"]], abs=2e-6)


def test_classifier_weights_and_label_are_checked_before_work(
    tmp_path: Path, classifier_dir: Path
) -> None:
    up = {"download": write_stage(tmp_path, "download", CLASSIFIED_SHARDS)}
    spec = {"model": str(classifier_dir), "label": "nsfw", "max": 0.5}
    key = filter_key(curation_config(classifiers=[spec]), up)
    other = save_classifier(tmp_path / "other", seed=1)
    assert filter_key(curation_config(classifiers=[{**spec, "model": str(other)}]), up) != key
    wrong = curation_config(classifiers=[{**spec, "label": "watermark"}])
    with pytest.raises(UserError, match=r"label 'watermark' is not one of .*\(safe, nsfw\)"):
        filter_samples(wrong, up, str(tmp_path))
    assert not (tmp_path / "stages" / "filter").exists()


def test_grown_dataset_classifies_only_new_rows(
    tmp_path: Path, classifier_dir: Path, monkeypatch: pytest.MonkeyPatch, one_torch_thread
) -> None:
    import sdflow.data.filters.classifier as classifier

    seen: list[str] = []
    real = classifier.label_probabilities
    monkeypatch.setattr(
        classifier,
        "label_probabilities",
        lambda rows, spec: seen.extend(r["id"] for r in rows) or real(rows, spec),
    )
    config = curation_config(
        classifiers=[{"model": str(classifier_dir), "label": "nsfw", "max": 0.3}]
    )
    first = [CLASSIFIED_SHARDS[0], CLASSIFIED_SHARDS[1][:1]]
    filter_samples(
        config, {"download": write_stage(tmp_path, "download", first, "n1")}, str(tmp_path)
    )
    assert sorted(seen) == ["c0", "c1", "c2", "c3", "c4", "c5"]
    seen.clear()
    grown = write_stage(tmp_path, "download", CLASSIFIED_SHARDS, "n2")
    incremental = filter_samples(config, {"download": grown}, str(tmp_path))
    assert sorted(seen) == ["c6", "c7"]
    scratch = tmp_path / "scratch"
    fresh = filter_samples(
        config,
        {"download": write_stage(scratch, "download", CLASSIFIED_SHARDS, "n2")},
        str(scratch),
    )
    assert fates(tmp_path, incremental) == fates(scratch, fresh)
    assert "classifier:nsfw" in fates(scratch, fresh).values()
    assert incremental["fingerprint"] == fresh["fingerprint"]


# ------------------------------------------------------------ CLIP score and aesthetic predictor

WORDS = ["red", "blue", "green", "yellow"], ["circle", "square", "triangle"]
CLIP_ROWS = {
    f"k{i}": (picture(200 + i), f"a {WORDS[0][i % 4]} {WORDS[1][i % 3]}") for i in range(8)
}
CLIP_SHARDS = [
    [
        sample(s, (i, 5, 5), caption, data=encoded(im))
        for i, (s, (im, caption)) in enumerate(CLIP_ROWS.items())
        if i < 5
    ],
    [
        sample(s, (i, 5, 5), caption, data=encoded(im))
        for i, (s, (im, caption)) in enumerate(CLIP_ROWS.items())
        if i >= 5
    ],
]


@pytest.fixture(scope="module")
def tiny_clip(clip_dir: Path) -> Path:  # the shared tiny CLIPModel + processor (fixtures.clip)
    return clip_dir


def clip_reference(tiny_clip: Path) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Cosine of each row's image and caption, and each image embedding, from CLIPModel.forward."""
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    images = [
        torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im, _ in CLIP_ROWS.values()
    ]
    cosines = pair_cosines(
        model, processor, torch.stack(images), [c for _, c in CLIP_ROWS.values()]
    )
    inputs = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        embeds = model(
            **inputs, input_ids=torch.ones(len(images), 2, dtype=torch.long)
        ).image_embeds
    return dict(zip(CLIP_ROWS, cosines.tolist(), strict=True)), dict(
        zip(CLIP_ROWS, embeds.tolist(), strict=True)
    )


def midpoint(values: dict[str, float]) -> float:
    ordered = sorted(values.values())
    assert ordered[4] - ordered[3] > 1e-3
    return (ordered[3] + ordered[4]) / 2


@pytest.fixture(scope="module")
def aesthetic_head(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, float]:
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(1, 16)).astype(np.float32), np.array([5.0], np.float32)
    path = tmp_path_factory.mktemp("aesthetic") / "head.safetensors"
    save_file({"weight": weight, "bias": bias}, str(path))
    return path, weight[0].astype(np.float64), 5.0


def test_clip_score_and_aesthetic_share_one_embedding_pass(
    tmp_path: Path, tiny_clip: Path, aesthetic_head, one_torch_thread
) -> None:
    cosines, embeds = clip_reference(tiny_clip)
    head, weight, bias = aesthetic_head
    scores = {s: float(np.dot(weight, e) + bias) for s, e in embeds.items()}
    min_cos, min_score = midpoint(cosines), midpoint(scores)
    config = curation_config(
        clip_model=str(tiny_clip),
        clip_score={"min": min_cos},
        aesthetic={"weights": str(head), "min": min_score},
    )
    download = write_stage(tmp_path, "download", CLIP_SHARDS)
    manifest = filter_samples(config, {"download": download}, str(tmp_path))
    expected = {
        s: "clip_score"
        if cosines[s] < min_cos
        else "aesthetic"
        if scores[s] < min_score
        else "kept"
        for s in CLIP_ROWS
    }
    assert fates(tmp_path, manifest) == expected
    assert {"clip_score", "aesthetic", "kept"} <= set(expected.values())
    for failure in read_failures(tmp_path, manifest).to_pylist():
        name, reference = (
            ("cosine", cosines) if failure["reason"] == "clip_score" else ("score", scores)
        )
        shown = re.fullmatch(rf"{name} (-?[0-9.]+) < min \S+", failure["detail"])
        assert shown and float(shown[1]) == pytest.approx(reference[failure["id"]], abs=1e-5)
    outputs = list((tmp_path / "stages" / "clip").glob("*/MANIFEST.json"))
    assert (
        len(outputs) == 1
        and manifest["info"]["clip_embeddings"] == f"stages/clip/{outputs[0].parent.name}"
    )
    assert json.loads(outputs[0].read_text())["info"]["rows_computed"] == 8


def test_a_grown_dataset_embeds_only_its_new_rows(
    tmp_path: Path, tiny_clip: Path, one_torch_thread
) -> None:
    cosines, _ = clip_reference(tiny_clip)
    config = curation_config(clip_model=str(tiny_clip), clip_score={"min": midpoint(cosines)})
    first = [CLIP_SHARDS[0], CLIP_SHARDS[1][:1]]
    filter_samples(
        config, {"download": write_stage(tmp_path, "download", first, "n1")}, str(tmp_path)
    )
    grown = filter_samples(
        config, {"download": write_stage(tmp_path, "download", CLIP_SHARDS, "n2")}, str(tmp_path)
    )
    clip = json.loads((tmp_path / grown["info"]["clip_embeddings"] / "MANIFEST.json").read_text())
    assert clip["info"]["rows_computed"] == 2 and clip["counts"]["input"] == 8
    assert {s for s, f in fates(tmp_path, grown).items() if f == "clip_score"} == {
        s for s, c in cosines.items() if c < midpoint(cosines)
    }


def test_an_aesthetic_head_that_is_not_one_linear_layer_is_refused(
    tmp_path: Path, tiny_clip: Path
) -> None:
    head = tmp_path / "mlp.safetensors"
    save_file(
        {"a.weight": np.ones((4, 16), np.float32), "a.bias": np.ones(4, np.float32)}, str(head)
    )
    config = curation_config(clip_model=str(tiny_clip), aesthetic={"weights": str(head), "min": 5})
    download = write_stage(tmp_path, "download", CLIP_SHARDS)
    with pytest.raises(UserError, match=r"one linear layer.*'a.weight': \[4, 16\]"):
        filter_samples(config, {"download": download}, str(tmp_path))
    (tmp_path / "pickled.pt").write_bytes(b"\x80\x04K\x01.")
    bad = curation_config(
        clip_model=str(tiny_clip), aesthetic={"weights": str(tmp_path / "pickled.pt"), "min": 5}
    )
    with pytest.raises(UserError, match="is not a safetensors file"):
        filter_samples(bad, {"download": download}, str(tmp_path))
    assert not (tmp_path / "stages" / "clip").exists()  # refused before the embedding pass


def image_embeds(clip: Path, images: list[Image.Image]) -> np.ndarray:
    """Reference: normalised image embeddings from CLIPModel.forward."""
    model = CLIPModel.from_pretrained(clip).eval()
    inputs = CLIPProcessor.from_pretrained(clip)(images=images, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, input_ids=torch.ones(len(images), 2, dtype=torch.long))
    return out.image_embeds.double().numpy()


def greedy(ids: list[str], embeds: np.ndarray, bound: float) -> dict[str, tuple[str, float]]:
    """Reference: in order, each row against every kept row; rejected id -> (twin, cosine)."""
    kept: list[int] = []
    rejected = {}
    for row in range(len(ids)):
        cosines = [(float(embeds[row] @ embeds[k]), -k) for k in kept]
        best = max(cosines, default=(-2.0, 0))
        if best[0] >= bound:
            rejected[ids[row]] = (ids[-best[1]], best[0])
        else:
            kept.append(row)
    return rejected


@pytest.mark.parametrize("resumed", [False, True])
def test_semantic_duplicates_keep_the_first(
    tmp_path: Path,
    tiny_clip: Path,
    resumed: bool,
    monkeypatch: pytest.MonkeyPatch,
    one_torch_thread,
) -> None:
    extra = {"k0v": variant(picture(200)), "k3v": variant(picture(203))}
    shards = [
        *CLIP_SHARDS,
        [sample(s, (i, 4, 4), data=encoded(im)) for i, (s, im) in enumerate(extra.items())],
    ]
    ids = [row["id"] for shard in shards for row in shard]
    images = {**{s: im for s, (im, _) in CLIP_ROWS.items()}, **extra}
    expected = greedy(ids, image_embeds(tiny_clip, [images[s] for s in ids]), 0.99)
    assert {s: t for s, (t, _) in expected.items()} == {"k0v": "k0", "k3v": "k3"}
    config = curation_config(clip_model=str(tiny_clip), semantic_dedup={"epsilon": 0.01})
    up = {"download": write_stage(tmp_path, "download", shards)}
    if resumed:  # shard 0 (with k0, k3) was finished before a crash: its embeddings come back
        crash_on_second_shard(monkeypatch)
        with pytest.raises(RuntimeError, match="killed"):
            filter_samples(config, up, str(tmp_path))
    manifest = filter_samples(config, up, str(tmp_path))
    assert fates(tmp_path, manifest) == {
        s: "semantic_duplicate" if s in expected else "kept" for s in ids
    }
    for failure in read_failures(tmp_path, manifest).to_pylist():
        shown = re.fullmatch(r"(\S+) at cosine ([0-9.]+)", failure["detail"])
        twin, cosine = expected[failure["id"]]
        assert shown and shown[1] == twin and float(shown[2]) == pytest.approx(cosine, abs=1e-5)
    assert manifest["info"]["semantic_clusters"] == 1


@pytest.mark.parametrize("rows_per_cluster", [10_000, 25])
def test_semantic_index_against_a_full_scan(tmp_path: Path, rows_per_cluster: int) -> None:
    rng = np.random.default_rng(rows_per_cluster)
    base = rng.normal(size=(200, 16))
    copies = base[rng.integers(0, 200, 100)] + rng.normal(scale=0.01, size=(100, 16))
    vectors = np.concatenate([base, copies])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"r{i}" for i in range(len(vectors))]
    path = tmp_path / "clip.parquet"
    pq.write_table(pa.table({"image_embed": vectors.astype(np.float32).tolist()}), path)
    centroids = fit_centroids([path], len(vectors), rows_per_cluster)
    assert len(centroids) == max(1, len(vectors) // rows_per_cluster)
    index, got = SemanticDuplicates(0.02, centroids), {}
    for sample_id, vector in zip(ids, vectors.astype(np.float32).tolist(), strict=True):
        twin = index.twin(vector)
        if twin is None:
            index.add(vector, sample_id)
        else:
            got[sample_id] = twin[0]
    expected = {s: t for s, (t, _) in greedy(ids, vectors, 0.98).items()}
    assert len(expected) >= 100  # every planted copy
    if len(centroids) == 1:
        assert got == expected
    else:  # clusters: a copy is compared within its original's cluster, as SemDeDup does
        assert len(set(got.items()) & set(expected.items())) >= 0.95 * len(expected)
        assert set(got) <= set(expected)


def test_rows_without_a_caption_embedding_are_not_clip_scored() -> None:
    bounds = Bounds(min=0.7)
    assert check_clip_score({"clip_image": [1.0, 0.0], "clip_text": None}, bounds) is None
    rejected = check_clip_score({"clip_image": [1.0, 0.0], "clip_text": [0.6, 0.8]}, bounds)
    assert rejected == Rejection("clip_score", "cosine 0.600000 < min 0.7")
