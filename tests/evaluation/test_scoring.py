"""The scorer of a model's images (`sdflow.evaluation.scoring`): per-prompt CLIP score and CMMD
against torchmetrics and CLIPModel.forward, the grid images kept out of the FID set."""

from __future__ import annotations

import pytest
import torch
from fixtures.clip import CAPTIONS, draw_shapes
from transformers import CLIPModel, CLIPProcessor

from sdflow.config import EvalConfig
from sdflow.evaluation import distribution
from sdflow.evaluation.scoring import Scorer
from sdflow.models.clip import make_clip_score

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def image_embeds(model, processor, images: torch.Tensor) -> torch.Tensor:
    """Normalised image embeddings through CLIPModel.forward, independent of our embedder."""
    inputs = processor(text=["x"], images=list(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**inputs).image_embeds.double()


def test_per_prompt_clip_score_and_cmmd_match_torchmetrics_and_clip_forward(clip_dir):
    images, reals = draw_shapes(8, seed=0), draw_shapes(6, seed=1)
    prompts = [CAPTIONS[i % 4] for i in range(8)]
    scorer = Scorer(EvalConfig(fid_features="random-cnn", clip_model=str(clip_dir), nearest_k=2))
    scorer.add_real(reals)
    model = scorer.start()
    model.add(images[:4], prompts[:4], for_distribution=False)  # grid images: CLIP score only
    model.add(images[4:], prompts[4:], for_distribution=True)
    result = model.result()

    rows = result["clip_score_per_prompt"]
    assert [r["clip_score"] for r in rows] == sorted(r["clip_score"] for r in rows)
    for row in rows:
        picked = [i for i, p in enumerate(prompts) if p == row["prompt"]]
        reference = make_clip_score(str(clip_dir))
        reference.update(images[picked], [prompts[i] for i in picked])
        assert row["num_images"] == 2
        assert row["clip_score"] == pytest.approx(float(reference.compute()), rel=1e-4, abs=1e-4)
    reference = make_clip_score(str(clip_dir))
    reference.update(images, prompts)
    assert result["clip_score"] == pytest.approx(float(reference.compute()), rel=1e-4)

    clip_model, processor = (
        CLIPModel.from_pretrained(clip_dir),
        CLIPProcessor.from_pretrained(clip_dir),
    )
    want = distribution.cmmd(
        image_embeds(clip_model, processor, reals),
        image_embeds(clip_model, processor, images[4:]),
        "c",
    )
    cmmd = result["metrics"]["cmmd"]
    assert cmmd["value"] == pytest.approx(want.value, rel=1e-5) and cmmd["value"] > 0
    assert (cmmd["num_generated"], cmmd["num_real"]) == (4, 6) and str(clip_dir) in cmmd["features"]
    assert result["metrics"]["fid"]["num_generated"] == 4  # the grid images are not in the FID set
