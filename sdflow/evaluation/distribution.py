"""Distances between a generated and a real image set, from feature vectors extracted once.

Each function takes float [N, D] features (real, generated) and returns a `Metric`: its value, or
`None` with the reason it cannot be computed from these samples; never a made-up number.

- FID (Heusel et al. 2017) and KID (Binkowski et al. 2018): torchmetrics, fed the features through a
  pass-through "network", so the feature network runs once for all metrics. KID averages the unbiased
  polynomial-kernel MMD over `KID_SUBSETS` random subsets of `min(1000, N_real, N_generated)` samples
  (torchmetrics' default of 1000 when there are that many), seeded, so a rerun gives the same value.
- Precision and recall (Kynkaanniemi et al. 2019) and density and coverage (Naeem et al. 2020): the
  k-nearest-neighbour definitions of the `prdc` reference implementation (strict `<` against the
  distance to the k-th nearest neighbour, the point itself excluded), in torch.
- CMMD (Jayasumana et al. 2024): MMD with a Gaussian RBF kernel (sigma 10, scaled by 1000, the
  paper's and its reference code's constants, biased estimator) on L2-normalised CLIP image
  embeddings.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

KID_MAX_SUBSET = 1000  # torchmetrics' default subset size
KID_SUBSETS = 100  # torchmetrics' default number of subsets
KID_SEED = 0
CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0


@dataclass
class Metric:
    """One score with what it was computed from; `value` None means `reason` says why."""

    value: float | None
    features: str
    num_generated: int
    num_real: int
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class _GivenFeatures(nn.Module):
    """A "feature network" that returns its input: the features were extracted beforehand."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid(real: torch.Tensor, fake: torch.Tensor, features: str) -> Metric:
    """Frechet distance of the two feature Gaussians (>= 0; rounding noise below 0 is clipped)."""
    metric = Metric(None, features, len(fake), len(real))
    if len(real) < 2 or len(fake) < 2:
        metric.reason = "FID needs at least 2 real and 2 generated images"
        return metric
    scorer = FrechetInceptionDistance(feature=_GivenFeatures(real.shape[1]), normalize=False)
    scorer.update(real.double(), real=True)
    scorer.update(fake.double(), real=False)
    metric.value = max(float(scorer.compute()), 0.0)
    return metric


def kid(real: torch.Tensor, fake: torch.Tensor, features: str) -> Metric:
    """Mean KID over seeded random subsets; `details` holds its std, subset size and count."""
    metric = Metric(None, features, len(fake), len(real))
    subset = min(KID_MAX_SUBSET, len(real), len(fake))
    if subset < 2:
        metric.reason = "KID needs at least 2 real and 2 generated images"
        return metric
    with warnings.catch_warnings():  # "saves all features": they are in memory already
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        scorer = KernelInceptionDistance(
            feature=_GivenFeatures(real.shape[1]),
            subsets=KID_SUBSETS,
            subset_size=subset,
            normalize=False,
        )
    scorer.update(real.double(), real=True)
    scorer.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(KID_SEED)
        mean, std = scorer.compute()
    metric.value = float(mean)
    metric.details = {"std": float(std), "subset_size": subset, "subsets": KID_SUBSETS}
    return metric


def kth_neighbour_distances(points: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point (its own zero excluded)."""
    return torch.cdist(points, points).kthvalue(k + 1, dim=1).values


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int, features: str) -> dict[str, Metric]:
    """Precision, recall, density and coverage with k nearest neighbours (Naeem et al.'s code).

    precision: share of generated points inside some real point's k-NN ball (quality);
    recall: share of real points inside some generated point's k-NN ball (diversity);
    density: real k-NN balls each generated point lies in, divided by k, averaged (quality,
      can exceed 1); coverage: share of real points whose k-NN ball holds a generated point.
    """
    names = ("precision", "recall", "density", "coverage")
    detail = {"k": k}
    if len(real) <= k or len(fake) <= k:
        reason = f"needs more than eval.nearest_k={k} real and generated images"
        return {n: Metric(None, features, len(fake), len(real), reason, detail) for n in names}
    real, fake = real.double(), fake.double()
    real_radii = kth_neighbour_distances(real, k)
    fake_radii = kth_neighbour_distances(fake, k)
    distances = torch.cdist(real, fake)  # [real, generated]
    inside_real = distances < real_radii[:, None]
    values = {
        "precision": inside_real.any(dim=0).double().mean(),
        "recall": (distances < fake_radii[None, :]).any(dim=1).double().mean(),
        "density": inside_real.sum(dim=0).double().mean() / k,
        "coverage": (distances.min(dim=1).values < real_radii).double().mean(),
    }
    return {
        n: Metric(float(values[n]), features, len(fake), len(real), None, detail) for n in names
    }


def cmmd(real: torch.Tensor, fake: torch.Tensor, features: str) -> Metric:
    """CMMD of L2-normalised embeddings: scale * (mean k(x,x') + mean k(y,y') - 2 mean k(x,y))."""
    metric = Metric(None, features, len(fake), len(real))
    metric.details = {"sigma": CMMD_SIGMA, "scale": CMMD_SCALE}
    if len(real) < 1 or len(fake) < 1:
        metric.reason = "CMMD needs at least 1 real and 1 generated image"
        return metric
    x, y = _unit(real.double()), _unit(fake.double())
    gamma = 1.0 / (2.0 * CMMD_SIGMA**2)

    def mean_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-gamma * torch.cdist(a, b).square()).mean()

    value = CMMD_SCALE * (mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y))
    metric.value = max(float(value), 0.0)
    return metric


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=1, keepdim=True)


def feature_metrics(
    real: torch.Tensor, fake: torch.Tensor, features: str, k: int
) -> dict[str, Metric]:
    """FID, KID, precision, recall, density and coverage of one pair of feature sets."""
    return {
        "fid": fid(real, fake, features),
        "kid": kid(real, fake, features),
        **prdc(real, fake, k, features),
    }
