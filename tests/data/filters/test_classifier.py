"""Image classifiers of the filter stage (`sdflow.data.filters.classifier`): rejection by
probability against the model's own, settings checked before work, incremental reuse."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from fixtures.filtering import (
    curation_config,
    encoded,
    fates,
    picture,
    sample,
)
from fixtures.stages import write_stage
from PIL import Image
from transformers import (
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from sdflow.errors import UserError
from sdflow.store.stageio import read_failures
from tasks.filter import filter_key, filter_samples


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
