"""Feature networks (random-cnn, hash-checked Inception), the distribution metrics against
independent references, mode collapse, and CLIP score, on tiny images and a tiny CLIP."""

from __future__ import annotations

import hashlib
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.clip import CAPTIONS, draw_shapes, pair_cosines
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from sdflow.config import EvalConfig
from sdflow.errors import UserError
from sdflow.evaluation import distribution, features
from sdflow.evaluation.features import RandomCNNFeatures, decode_image, to_uint8
from sdflow.evaluation.scoring import Scorer
from sdflow.models.clip import load_clip, make_clip_score

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fid_between(real: torch.Tensor, fake: torch.Tensor) -> float:
    net = features.FeatureNet("random-cnn")
    return distribution.fid(net(real), net(fake), net.label).value


def test_random_cnn_features_are_fixed_and_shaped():
    images = draw_shapes(4, seed=0)
    a, b = RandomCNNFeatures(), RandomCNNFeatures()
    out = a(images)
    assert out.shape == (4, a.num_features)
    assert torch.equal(out, b(images))  # same seed, same weights, whatever torch's RNG did
    assert not torch.equal(out, RandomCNNFeatures(seed=1)(images))
    with pytest.raises(ValueError, match="uint8"):
        a(images.float())


def test_random_cnn_fid_is_zero_for_the_same_set_and_large_for_noise():
    real = draw_shapes(16, seed=0)
    other_shapes = draw_shapes(16, seed=1)
    noise = torch.randint(
        0, 256, real.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    same = fid_between(real, real)
    similar = fid_between(real, other_shapes)
    far = fid_between(real, noise)
    assert same == pytest.approx(0.0, abs=1e-3)
    assert math.isfinite(far) and far > 10 * similar > 0


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


# ------------------------------------------------------------------------------ Inception weights


def _hub_dir(monkeypatch, path: Path) -> Path:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(path))
    # a closed local port: the download fails at once, with or without internet
    monkeypatch.setattr(features, "INCEPTION_URL", "http://127.0.0.1:9/" + features.INCEPTION_FILE)
    return path / "checkpoints" / features.INCEPTION_FILE


def test_inception_hash_prefix_is_the_published_one():
    assert features.INCEPTION_SHA256_PREFIX == "6726825d"


def test_inception_without_weights_names_the_setting(tmp_path, monkeypatch):
    target = _hub_dir(monkeypatch, tmp_path / "hub")
    with pytest.raises(UserError) as info:
        features.FeatureNet("inception")
    message = str(info.value)
    for needed in ("eval.fid_features", features.INCEPTION_FILE, str(target.parent), "random-cnn"):
        assert needed in message
    assert not target.exists()  # no half-downloaded file left behind


def test_inception_loads_weights_from_the_hub_cache(tmp_path, monkeypatch):
    """Random Inception weights in the right place, their hash taken as the published one:
    found, checked, used."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    target = _hub_dir(monkeypatch, tmp_path / "hub")
    with monkeypatch.context() as patch:  # build the network once without any weights file
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda *a: None)
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    target.parent.mkdir(parents=True)
    torch.save(net.state_dict(), target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    monkeypatch.setattr(features, "INCEPTION_SHA256_PREFIX", digest[:8])
    extractor = features.FeatureNet("inception")
    assert extractor.net.use_antialias is False  # TF-1.x resize, as published FIDs
    out = extractor(draw_shapes(2, seed=0))
    assert out.shape == (2, 2048)
    with torch.no_grad():  # torch-fidelity's own extractor with the weights the file holds
        (expected,) = net(draw_shapes(2, seed=0))
    torch.testing.assert_close(out, expected.to(out.dtype))
    loaded = extractor.net.state_dict()["Conv2d_1a_3x3.conv.weight"]
    assert torch.equal(loaded, net.state_dict()["Conv2d_1a_3x3.conv.weight"])


def test_a_wrong_download_is_refused_and_not_kept(tmp_path, monkeypatch):
    """A local server hands out the wrong bytes: refused before they land in the hub cache."""
    import http.server
    import threading

    class Wrong(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "9")
            self.end_headers()
            self.wfile.write(b"not these")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Wrong)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        target = _hub_dir(monkeypatch, tmp_path / "hub")
        url = f"http://127.0.0.1:{server.server_port}/{features.INCEPTION_FILE}"
        monkeypatch.setattr(features, "INCEPTION_URL", url)
        with pytest.raises(UserError, match=hashlib.sha256(b"not these").hexdigest()):
            features.FeatureNet("inception")
    finally:
        server.shutdown()
    assert list(target.parent.iterdir()) == []  # neither the file nor a temp file


@pytest.mark.parametrize("content", [b"", b"not the weights", pickle.dumps({"w": [1.0]})])
def test_a_corrupted_or_foreign_inception_file_is_refused(tmp_path, monkeypatch, content):
    target = _hub_dir(monkeypatch, tmp_path / "hub")
    target.parent.mkdir(parents=True)
    target.write_bytes(content)
    with pytest.raises(UserError) as info:
        features.FeatureNet("inception")
    message = str(info.value)
    assert hashlib.sha256(content).hexdigest() in message
    assert "starts with 6726825d" in message and "delete it" in message and str(target) in message


def test_clip_score_from_a_local_directory(clip_dir):
    images = draw_shapes(4, seed=0)
    score = make_clip_score(str(clip_dir))
    score.update(images[:2], CAPTIONS[:2])  # two batches, as the evaluate stage feeds it
    score.update(images[2:], CAPTIONS[2:])
    value = float(score.compute())
    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    expected = 100 * float(pair_cosines(model, processor, images, CAPTIONS).mean())
    assert math.isfinite(value) and 0.0 < value <= 100.0
    assert value == pytest.approx(expected, rel=1e-4)


def test_clip_truncates_long_captions_keeping_the_end_token(clip_dir):
    _, processor = load_clip(str(clip_dir))
    long_caption = " ".join(["a very long caption"] * 20)
    ids = processor(text=[long_caption, "a red circle"], return_tensors="pt", padding=True)
    ids = ids["input_ids"]
    assert ids.shape[1] == 16
    assert ids[0, -1].item() == 1  # the end-of-text token CLIP pools the caption from


def test_clip_model_missing_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="eval.clip_model"):
        load_clip(str(tmp_path / "no-such-clip"))


def test_to_uint8_and_decode_image_give_uint8_nchw():
    floats = np.linspace(0, 1, 2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
    images = to_uint8(floats)
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 8, 8)
    assert images.min() == 0 and images.max() == 255
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), (10, 20, 30)).save(buffer, format="PNG")
    decoded = decode_image(buffer.getvalue(), 16)  # non-square: centre-cropped, resized
    assert decoded.shape == (3, 16, 16) and decoded.dtype == torch.uint8
    assert decoded[:, 8, 8].tolist() == [10, 20, 30]


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


def test_metric_curve_draws_one_panel_per_metric_with_values():
    import io

    from sdflow.evaluation.curves import draw_metric_curve

    rows = [
        {"step": 4, "fid": 9.0, "kid": 0.5, "precision": 0.2, "clip_score": None},
        {"step": 8, "fid": 3.0, "kid": 0.1, "precision": 0.6, "clip_score": None},
    ]
    image = Image.open(io.BytesIO(draw_metric_curve(rows))).convert("RGB")
    assert image.size == (640, 2 * 180)  # fid, kid, precision: two rows of two panels
    pixels = np.asarray(image)
    line = (pixels == (0x1F, 0x5F, 0xBF)).all(-1)
    assert line[:180, :320].any() and line[:180, 320:].any() and line[180:, :320].any()
    assert not line[180:, 320:].any()  # no fourth panel: clip_score has no value
