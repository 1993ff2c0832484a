"""Feature networks: the fixed random-cnn, the hash-checked Inception (torch-fidelity's, loaded
from the hub cache or refused), and the uint8 image conversions."""

from __future__ import annotations

import hashlib
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.clip import draw_shapes
from fixtures.servers import base_url, loopback, running
from PIL import Image

from sdflow.errors import UserError
from sdflow.evaluation import distribution, features
from sdflow.evaluation.features import RandomCNNFeatures, decode_image, to_uint8

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


# ------------------------------------------------------------------------------ Inception weights


def _hub_dir(monkeypatch, path: Path) -> Path:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(path))
    # a closed local port: the download fails at once, with or without internet
    monkeypatch.setattr(features, "INCEPTION_URL", "http://127.0.0.1:9/" + features.INCEPTION_FILE)
    return path / "checkpoints" / features.INCEPTION_FILE


def test_inception_hash_is_the_published_one_in_full():
    assert torch.hub.HASH_REGEX.search(features.INCEPTION_FILE).group(1) == "6726825d"
    assert features.INCEPTION_SHA256.startswith("6726825d") and len(features.INCEPTION_SHA256) == 64
    features._check_digest(features.INCEPTION_SHA256, "the file", "delete it")
    with pytest.raises(UserError, match="not the published"):  # the name's prefix is not enough
        features._check_digest(features.INCEPTION_SHA256[:8] + "0" * 56, "the file", "delete it")


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
    monkeypatch.setattr(features, "INCEPTION_SHA256", digest)
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

    class Wrong(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "9")
            self.end_headers()
            self.wfile.write(b"not these")

        def log_message(self, *args):
            pass

    with running(loopback(Wrong)) as server:
        target = _hub_dir(monkeypatch, tmp_path / "hub")
        monkeypatch.setattr(
            features, "INCEPTION_URL", f"{base_url(server)}/{features.INCEPTION_FILE}"
        )
        with pytest.raises(UserError, match=hashlib.sha256(b"not these").hexdigest()):
            features.FeatureNet("inception")
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
    assert (
        features.INCEPTION_SHA256 in message and "delete it" in message and str(target) in message
    )


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
