"""The distribution metrics (FID, KID, precision / recall / density / coverage, CMMD) against
independent references, mode collapse, and their sample-size behaviour."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fixtures.clip import draw_shapes

from sdflow.config import EvalConfig
from sdflow.evaluation import distribution
from sdflow.evaluation.scoring import Scorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------- distribution metrics vs references


def gaussian_modes(count: int, modes: list[int], seed: int, dim: int = 8) -> torch.Tensor:
    """`count` points spread evenly over the given modes of 10 well-separated Gaussian modes."""
    centres = torch.randn(10, dim, generator=torch.Generator().manual_seed(123)) * 6
    noise = torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))
    return (centres[[modes[i % len(modes)] for i in range(count)]] + noise).double()


def brute_prdc(real: torch.Tensor, fake: torch.Tensor, k: int) -> dict[str, float]:
    """Naeem et al.'s definitions, loop by loop with math.dist (the point itself excluded)."""
    real_rows, fake_rows = real.tolist(), fake.tolist()

    def radius(points: list, i: int) -> float:
        return sorted(math.dist(points[i], q) for j, q in enumerate(points) if j != i)[k - 1]

    real_r = [radius(real_rows, i) for i in range(len(real_rows))]
    fake_r = [radius(fake_rows, j) for j in range(len(fake_rows))]
    within = [[math.dist(r, f) < real_r[i] for i, r in enumerate(real_rows)] for f in fake_rows]
    return {
        "precision": sum(any(row) for row in within) / len(fake_rows),
        "recall": sum(
            any(math.dist(r, f) < fake_r[j] for j, f in enumerate(fake_rows)) for r in real_rows
        )
        / len(real_rows),
        "density": sum(sum(row) for row in within) / (k * len(fake_rows)),
        "coverage": sum(
            min(math.dist(r, f) for f in fake_rows) < real_r[i] for i, r in enumerate(real_rows)
        )
        / len(real_rows),
    }


def test_prdc_matches_a_brute_force_reference_and_torch_fidelity():
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    real = gaussian_modes(40, list(range(10)), seed=1)
    fake = gaussian_modes(30, [0, 1, 2, 3], seed=2) * 1.1
    for k in (1, 3, 5):
        got = {n: m.value for n, m in distribution.prdc(real, fake, k, "f").items()}
        assert got == pytest.approx(brute_prdc(real, fake, k), abs=1e-12)
        # torch-fidelity: generated first; it counts ties (<=), which random floats never make
        precision, recall = calculate_precision_recall_full(fake, real, neighborhood=k)
        assert (got["precision"], got["recall"]) == pytest.approx((precision, recall))
    assert 0 < got["coverage"] < 1 and got["density"] > 0


def test_prdc_with_too_few_samples_is_null_with_the_reason():
    out = distribution.prdc(torch.zeros(5, 3), torch.ones(9, 3), 5, "f")
    assert {m.value for m in out.values()} == {None}
    assert all("eval.nearest_k=5" in m.reason for m in out.values())


def test_fid_and_kid_match_independent_computations():
    real, fake = gaussian_modes(24, [0, 1, 2], seed=3), gaussian_modes(24, [1, 2, 4], seed=4)
    r, f = real.numpy(), fake.numpy()
    mu_r, mu_f = r.mean(0), f.mean(0)
    cov_r, cov_f = np.cov(r, rowvar=False), np.cov(f, rowvar=False)
    values, vectors = np.linalg.eigh(cov_r)  # tr sqrt(C_r C_f) = tr sqrt(C_r^1/2 C_f C_r^1/2)
    root = vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = np.clip(np.linalg.eigvalsh(root @ cov_f @ root), 0, None)
    want = ((mu_r - mu_f) ** 2).sum() + np.trace(cov_r) + np.trace(cov_f) - 2 * np.sqrt(inner).sum()
    assert distribution.fid(real, fake, "f").value == pytest.approx(want, rel=1e-6)

    kid = distribution.kid(real, fake, "f")  # 24 samples: every subset is the whole set
    assert kid.details["subset_size"] == 24 and kid.details["std"] == pytest.approx(0, abs=1e-9)
    kernel = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731
    m = len(r)
    k_rr, k_ff = kernel(r, r), kernel(f, f)
    unbiased = (k_rr.sum() - np.trace(k_rr)) / (m * (m - 1))
    unbiased += (k_ff.sum() - np.trace(k_ff)) / (m * (m - 1)) - 2 * kernel(r, f).mean()
    assert kid.value == pytest.approx(unbiased, rel=1e-6)
    assert distribution.kid(real[:1], fake, "f").reason.startswith("KID needs")


def test_cmmd_matches_a_loop_reference_with_the_papers_constants():
    real, fake = gaussian_modes(12, [0, 1], seed=5), gaussian_modes(9, [1, 3], seed=6)

    def mean_k(a: list, b: list) -> float:
        unit = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]  # noqa: E731
        values = [math.exp(-(math.dist(unit(x), unit(y)) ** 2) / 200) for x in a for y in b]
        return sum(values) / len(values)

    r, f = real.tolist(), fake.tolist()
    want = 1000 * (mean_k(r, r) + mean_k(f, f) - 2 * mean_k(r, f))
    got = distribution.cmmd(real, fake, "clip")
    assert got.value == pytest.approx(want, rel=1e-9) and got.value > 0
    assert distribution.cmmd(real, real, "clip").value == pytest.approx(0, abs=1e-9)


def test_a_collapsed_model_keeps_precision_and_loses_recall_and_coverage():
    """Copy of the reference vs a model collapsed onto 2 of its 10 modes, as feature sets."""
    real = gaussian_modes(200, list(range(10)), seed=7)
    copy = real.clone()
    collapsed = gaussian_modes(200, [3, 8], seed=8)
    good = distribution.feature_metrics(real, copy, "f", k=5)
    bad = distribution.feature_metrics(real, collapsed, "f", k=5)
    assert good["precision"].value == good["recall"].value == good["coverage"].value == 1.0
    assert bad["precision"].value > 0.9  # what it draws is real-looking ...
    assert bad["recall"].value < 0.3 and bad["coverage"].value < 0.3  # ... but only 2 modes of 10
    assert bad["fid"].value > good["fid"].value + 10 and bad["kid"].value > good["kid"].value


def test_collapsed_images_rank_the_same_by_kid_fid_and_recall():
    """The same on images through the random-cnn features, via the stage's Scorer (one pass)."""
    real = draw_shapes(48, seed=0)
    fresh = draw_shapes(48, seed=1)  # the same distribution, other draws
    collapsed = torch.cat([draw_shapes(2, seed=0)] * 24)  # two images, repeated
    scorer = Scorer(EvalConfig(fid_features="random-cnn"))
    scorer.add_real(real)
    results = []
    for images in (fresh, collapsed):
        model = scorer.start()
        model.add(images, ["x"] * len(images), for_distribution=True)
        results.append(model.result())
    good, bad = results
    assert good["fid"] < bad["fid"] and good["kid"] < bad["kid"]
    assert good["recall"] > 0.5 > bad["recall"] and good["coverage"] > 2 * bad["coverage"]
    assert bad["metrics"]["fid"]["num_generated"] == 48 == bad["metrics"]["kid"]["num_real"]


def mixture(count: int, modes: list[int], seed: int, dim: int = 32) -> torch.Tensor:
    """i.i.d. draws from the chosen modes of 10 Gaussians (mode picked at random per point)."""
    centres = torch.randn(10, dim, generator=torch.Generator().manual_seed(123)) * 3
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.tensor(modes)[torch.randint(len(modes), (count,), generator=generator)]
    return (centres[chosen] + torch.randn(count, dim, generator=generator)).double()


def test_sample_size_fid_is_biased_kid_is_not_coverage_is_stable():
    """What README "Reading the metrics" claims (bench/metric_samples.py prints the full table)."""
    means = {}
    for size in (50, 400):
        for model, modes in (("good", list(range(10))), ("collapsed", [0, 1])):
            runs = [
                distribution.feature_metrics(
                    mixture(size, list(range(10)), 2 * rep), mixture(size, modes, 2 * rep + 1),
                    "f", k=5,
                )
                for rep in range(3)
            ]  # fmt: skip
            means[size, model] = {
                name: sum(run[name].value for run in runs) / len(runs) for name in runs[0]
            }
    for size, kid_share, coverage in ((50, 0.1, 0.5), (400, 0.01, 0.3)):
        good, bad = means[size, "good"], means[size, "collapsed"]
        assert abs(good["kid"]) < kid_share * bad["kid"]  # unbiased: about 0, spread shrinks
        assert good["coverage"] > 0.9 and bad["coverage"] < coverage and bad["recall"] < 0.35
        assert bad["precision"] > 0.75  # collapse does not show in precision
    assert means[50, "good"]["precision"] > means[400, "good"]["precision"] + 0.05  # drifts with N
    assert means[50, "good"]["fid"] > 4 * means[400, "good"]["fid"] > 0  # bias ~ 1/N
