"""CLIP score and the aesthetic predictor (`sdflow.data.filters.clip`): one embedding pass, values
against CLIPModel.forward, incremental reuse, refused heads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.clip import pair_cosines
from fixtures.filtering import (
    CLIP_ROWS,
    CLIP_SHARDS,
    curation_config,
    fates,
)
from fixtures.stages import write_stage
from safetensors.numpy import save_file
from transformers import (
    CLIPModel,
    CLIPProcessor,
)

from sdflow.config import Bounds
from sdflow.data.filters import Rejection
from sdflow.data.filters.clip import check_clip_score
from sdflow.errors import UserError
from sdflow.store.stageio import read_failures
from tasks.filter import filter_samples


def clip_reference(clip_dir: Path) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Cosine of each row's image and caption, and each image embedding, from CLIPModel.forward."""
    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
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
    tmp_path: Path, clip_dir: Path, aesthetic_head, one_torch_thread
) -> None:
    cosines, embeds = clip_reference(clip_dir)
    head, weight, bias = aesthetic_head
    scores = {s: float(np.dot(weight, e) + bias) for s, e in embeds.items()}
    min_cos, min_score = midpoint(cosines), midpoint(scores)
    config = curation_config(
        clip_model=str(clip_dir),
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
    tmp_path: Path, clip_dir: Path, one_torch_thread
) -> None:
    cosines, _ = clip_reference(clip_dir)
    config = curation_config(clip_model=str(clip_dir), clip_score={"min": midpoint(cosines)})
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
    tmp_path: Path, clip_dir: Path
) -> None:
    head = tmp_path / "mlp.safetensors"
    save_file(
        {"a.weight": np.ones((4, 16), np.float32), "a.bias": np.ones(4, np.float32)}, str(head)
    )
    config = curation_config(clip_model=str(clip_dir), aesthetic={"weights": str(head), "min": 5})
    download = write_stage(tmp_path, "download", CLIP_SHARDS)
    with pytest.raises(UserError, match=r"one linear layer.*'a.weight': \[4, 16\]"):
        filter_samples(config, {"download": download}, str(tmp_path))
    (tmp_path / "pickled.pt").write_bytes(b"\x80\x04K\x01.")
    bad = curation_config(
        clip_model=str(clip_dir), aesthetic={"weights": str(tmp_path / "pickled.pt"), "min": 5}
    )
    with pytest.raises(UserError, match="is not a safetensors file"):
        filter_samples(bad, {"download": download}, str(tmp_path))
    assert not (tmp_path / "stages" / "clip").exists()  # refused before the embedding pass


def test_rows_without_a_caption_embedding_are_not_clip_scored() -> None:
    bounds = Bounds(min=0.7)
    assert check_clip_score({"clip_image": [1.0, 0.0], "clip_text": None}, bounds) is None
    rejected = check_clip_score({"clip_image": [1.0, 0.0], "clip_text": [0.6, 0.8]}, bounds)
    assert rejected == Rejection("clip_score", "cosine 0.600000 < min 0.7")
