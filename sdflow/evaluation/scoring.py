"""Score generated images against one real image set: every metric from one pass per network.

`Scorer` holds the feature network (`eval.fid_features`), the CLIP model when `eval.clip_model` is
set, and the real set's features and CLIP embeddings, extracted once and shared by every model it
scores. `Scorer.start()` gives a `ModelScores` that takes one model's images batch by batch: each
image goes once through the feature network (only the distribution set, `for_distribution=True`)
and once through CLIP; `result()` computes every metric from those vectors.

The result (what metrics.json holds per model): a flat value per metric (`fid`, `kid`, `precision`,
`recall`, `density`, `coverage`, `cmmd`, `clip_score`; `None` when it cannot be computed), `metrics`
with each one's features, sample counts, parameters and the reason for a `None`, and
`clip_score_per_prompt` over the evaluation prompts, worst-followed prompt first.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from sdflow.config import EvalConfig
from sdflow.evaluation.distribution import Metric, cmmd, feature_metrics
from sdflow.evaluation.features import FeatureNet
from sdflow.models.clip import ClipEmbedder, clip_score
from sdflow.ops.gpuslots import torch_device

NO_CLIP_REASON = "eval.clip_model not set"
DISTRIBUTION_METRICS = ("fid", "kid", "precision", "recall", "density", "coverage")
METRICS = (*DISTRIBUTION_METRICS, "cmmd", "clip_score")


def eval_device() -> torch.device:
    return torch_device()


class Scorer:
    """The networks and the real set; load it first, so a missing model fails before sampling."""

    def __init__(self, config: EvalConfig):
        device = eval_device()
        self.k = config.nearest_k
        self.features = FeatureNet(config.fid_features, device)
        self.clip = ClipEmbedder(config.clip_model, device) if config.clip_model else None
        self._real: list[torch.Tensor] = []
        self._real_clip: list[torch.Tensor] = []
        self._texts: dict[str, torch.Tensor] = {}

    def add_real(self, images: torch.Tensor) -> None:
        """A batch of real images (uint8 NCHW)."""
        self._real.append(self.features(images))
        if self.clip is not None:
            self._real_clip.append(self.clip.images(images))

    @property
    def num_real(self) -> int:
        return sum(len(batch) for batch in self._real)

    def real_features(self) -> torch.Tensor:
        return torch.cat(self._real)

    def real_clip(self) -> torch.Tensor | None:
        return torch.cat(self._real_clip) if self._real_clip else None

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """CLIP embeddings of prompts, each distinct prompt embedded once."""
        assert self.clip is not None
        new = [p for p in dict.fromkeys(prompts) if p not in self._texts]
        if new:
            self._texts.update(zip(new, self.clip.texts(new), strict=True))
        return torch.stack([self._texts[p] for p in prompts])

    def start(self) -> ModelScores:
        return ModelScores(self)


class ModelScores:
    """One model's images, reduced to feature vectors and CLIP cosines as they arrive."""

    def __init__(self, scorer: Scorer):
        self.scorer = scorer
        self.features: list[torch.Tensor] = []
        self.clip_images: list[torch.Tensor] = []
        self.cosines: dict[str, list[float]] = defaultdict(list)

    def add(self, images: torch.Tensor, prompts: list[str], for_distribution: bool) -> None:
        """Generated images (uint8 NCHW) with their prompts; `for_distribution`: also compared
        with the real set (the FID set), else only scored against their prompts (the grid)."""
        scorer = self.scorer
        if for_distribution:
            self.features.append(scorer.features(images))
        if scorer.clip is None:
            return
        embedded = scorer.clip.images(images)
        if for_distribution:
            self.clip_images.append(embedded)
        cosines = (embedded * scorer.text_embeddings(prompts)).sum(dim=1)
        for prompt, cosine in zip(prompts, cosines.tolist(), strict=True):
            self.cosines[prompt].append(cosine)

    def result(self, prompts: Sequence[str] | None = None) -> dict[str, Any]:
        """Every metric; the per-prompt table covers `prompts` (default: every prompt seen)."""
        scorer = self.scorer
        label = scorer.features.label
        fake = torch.cat(self.features)
        metrics = feature_metrics(scorer.real_features(), fake, label, scorer.k)
        metrics["cmmd"] = self._cmmd()
        metrics["clip_score"] = self._clip_score()
        return {
            **{name: metrics[name].value for name in METRICS},
            "metrics": {name: metrics[name].as_json() for name in METRICS},
            "clip_score_per_prompt": self.per_prompt(prompts),
        }

    def _cmmd(self) -> Metric:
        clip = self.scorer.clip
        if clip is None:
            count = sum(map(len, self.features))
            return Metric(
                None, "CLIP image embeddings", count, self.scorer.num_real, NO_CLIP_REASON
            )
        return cmmd(self.scorer.real_clip(), torch.cat(self.clip_images), clip.label)

    def _clip_score(self) -> Metric:
        clip = self.scorer.clip
        count = sum(len(c) for c in self.cosines.values())
        if clip is None:
            return Metric(None, "CLIP image and text embeddings", 0, 0, NO_CLIP_REASON)
        value = clip_score([c for values in self.cosines.values() for c in values])
        details = {"prompts": len(self.cosines)}
        return Metric(
            value, f"CLIP image and text embeddings ({clip.name})", count, 0, None, details
        )

    def per_prompt(self, prompts: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """CLIP score of each prompt's images (all of them: grid and FID set), the prompt the
        model follows worst first."""
        wanted = self.cosines.keys() if prompts is None else dict.fromkeys(prompts)
        rows = [
            {
                "prompt": p,
                "clip_score": clip_score(self.cosines[p]),
                "num_images": len(self.cosines[p]),
            }
            for p in wanted
            if p in self.cosines
        ]
        return sorted(rows, key=lambda row: (row["clip_score"], row["prompt"]))
