"""FID (random-cnn and inception wiring) and CLIP score helpers, on tiny images and a tiny CLIP."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from sdflow import metrics
from sdflow.config import ModelConfig
from sdflow.errors import UserError
from sdflow.models import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]


def draw_shapes(count: int, seed: int, size: int = 32) -> torch.Tensor:
    """uint8 [N, 3, size, size]: one coloured circle or square on white or black each."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        image = Image.new("RGB", (size, size), (255, 255, 255) if i % 2 else (0, 0, 0))
        draw = ImageDraw.Draw(image)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, side = int(rng.integers(2, size // 3)), int(rng.integers(size // 3, size // 2))
        (draw.ellipse if i % 3 else draw.rectangle)((x, x, x + side, x + side), fill=colour)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return torch.stack(images)


def fid_between(real: torch.Tensor, fake: torch.Tensor) -> float:
    fid = metrics.make_fid("random-cnn")
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return metrics.fid_value(fid)


def test_random_cnn_features_are_fixed_and_shaped():
    images = draw_shapes(4, seed=0)
    a, b = metrics.RandomCNNFeatures(), metrics.RandomCNNFeatures()
    features = a(images)
    assert features.shape == (4, a.num_features)
    assert torch.equal(features, b(images))  # same seed, same weights, whatever torch's RNG did
    assert not torch.equal(features, metrics.RandomCNNFeatures(seed=1)(images))
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


def test_fid_keeps_real_statistics_across_reset():
    real, noise = draw_shapes(8, seed=0), torch.full((8, 3, 32, 32), 128, dtype=torch.uint8)
    fid = metrics.make_fid("random-cnn")
    fid.update(real, real=True)
    fid.update(noise + torch.randint(0, 3, noise.shape, dtype=torch.uint8), real=False)
    first = metrics.fid_value(fid)
    fid.reset()  # what the evaluate stage does between the trained and the baseline model
    fid.update(real, real=False)
    assert first > 1.0
    assert metrics.fid_value(fid) == pytest.approx(0.0, abs=1e-3)


def _hub_dir(monkeypatch, path: Path) -> Path:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(path))
    # a closed local port: the download fails at once, with or without internet
    monkeypatch.setattr(metrics, "INCEPTION_URL", "http://127.0.0.1:9/" + metrics.INCEPTION_FILE)
    return path / "checkpoints" / metrics.INCEPTION_FILE


def test_inception_without_weights_names_the_setting(tmp_path, monkeypatch):
    target = _hub_dir(monkeypatch, tmp_path / "hub")
    with pytest.raises(UserError) as info:
        metrics.make_fid("inception")
    message = str(info.value)
    for needed in ("eval.fid_features", metrics.INCEPTION_FILE, str(target.parent), "random-cnn"):
        assert needed in message
    assert not target.exists()  # no half-downloaded file left behind


def test_inception_loads_weights_from_the_hub_cache(tmp_path, monkeypatch):
    """Random Inception weights in the right place: found, checked as plain tensors, used."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    target = _hub_dir(monkeypatch, tmp_path / "hub")
    with monkeypatch.context() as patch:  # build the network once without any weights file
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda *a: None)
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    target.parent.mkdir(parents=True)
    torch.save(net.state_dict(), target)
    fid = metrics.make_fid("inception")
    assert fid.inception.use_antialias is False  # TF-1.x resize, as published FIDs
    features = fid.inception(draw_shapes(2, seed=0))  # (FID itself is tested with random-cnn)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    loaded = fid.inception.state_dict()["Conv2d_1a_3x3.conv.weight"]
    assert torch.equal(loaded, net.state_dict()["Conv2d_1a_3x3.conv.weight"])


class _NotATensor:
    pass


def test_inception_weights_that_are_not_plain_tensors_are_refused(tmp_path, monkeypatch):
    target = _hub_dir(monkeypatch, tmp_path / "hub")
    target.parent.mkdir(parents=True)
    target.write_bytes(pickle.dumps({"weights": _NotATensor()}))
    with pytest.raises(UserError, match="not a plain tensor checkpoint"):
        metrics.make_fid("inception")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny CLIPModel + CLIPProcessor (trained BPE tokenizer, 32 px images) saved to a dir.

    Its text projection's sign is chosen so the test pairs have a positive mean cosine: CLIPScore
    clamps negative means to 0, which would make the score checks trivially pass.
    """
    root = tmp_path_factory.mktemp("clip")
    model_config = ModelConfig(tokenizer_vocab_size=600, max_token_length=16)
    tokenizer = train_tokenizer(CAPTIONS * 4, model_config, root / "tokenizer")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    text.update(vocab_size=len(tokenizer), max_position_embeddings=16)
    text.update(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    vision.update(image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=images, tokenizer=tokenizer)
    if pair_cosines(model, processor, draw_shapes(4, seed=0), CAPTIONS).mean() < 0:
        model.text_projection.weight.data.neg_()
    out = root / "tiny-clip"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def pair_cosines(model, processor, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Cosine of each (image, caption) pair through CLIPModel.forward, independent of CLIPScore."""
    inputs = processor(
        text=captions,
        images=list(images),
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=16,
    )
    with torch.no_grad():
        out = model(**inputs)
    return (out.image_embeds * out.text_embeds).sum(-1)


def test_clip_score_from_a_local_directory(clip_dir):
    images = draw_shapes(4, seed=0)
    score = metrics.make_clip_score(str(clip_dir))
    score.update(images[:2], CAPTIONS[:2])  # two batches, as the evaluate stage feeds it
    score.update(images[2:], CAPTIONS[2:])
    value = float(score.compute())
    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    expected = 100 * float(pair_cosines(model, processor, images, CAPTIONS).mean())
    assert math.isfinite(value) and 0.0 < value <= 100.0
    assert value == pytest.approx(expected, rel=1e-4)


def test_clip_truncates_long_captions_keeping_the_end_token(clip_dir):
    _, processor = metrics.load_clip(str(clip_dir))
    long_caption = " ".join(["a very long caption"] * 20)
    ids = processor(text=[long_caption, "a red circle"], return_tensors="pt", padding=True)
    ids = ids["input_ids"]
    assert ids.shape[1] == 16
    assert ids[0, -1].item() == 1  # the end-of-text token CLIP pools the caption from


def test_clip_model_missing_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="eval.clip_model"):
        metrics.load_clip(str(tmp_path / "no-such-clip"))


def test_to_uint8_and_decode_image_give_uint8_nchw():
    floats = np.linspace(0, 1, 2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
    images = metrics.to_uint8(floats)
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 8, 8)
    assert images.min() == 0 and images.max() == 255
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), (10, 20, 30)).save(buffer, format="PNG")
    decoded = metrics.decode_image(buffer.getvalue(), 16)  # non-square: centre-cropped, resized
    assert decoded.shape == (3, 16, 16) and decoded.dtype == torch.uint8
    assert decoded[:, 8, 8].tolist() == [10, 20, 30]
