"""Autoencoder stage: a scratch VAE trained on tiny caption shards, its scaling, held-out error, resume."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import tasks.autoencoder as autoencoder
from sdflow.models.components import image_to_tensor
from sdflow.profiles import load_profile
from sdflow.store.checkpoints import list_checkpoints
from sdflow.store.splits import is_held_out
from sdflow.store.stageio import StageBuild, build_stage
from tasks.autoencoder import train_autoencoder

OVERRIDES = [
    "autoencoder.steps=4",
    "autoencoder.batch_size=4",
    "autoencoder.checkpoint_every=2",
    "autoencoder.held_out=50",
    "eval.held_out_fraction=0.25",
    "autoencoder.augment.hue=0.5",  # its draws come from the checkpointed generator: resume is exact
]
COLORS = ["red", "green", "blue", "yellow", "white", "purple"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def shape_png(i: int) -> bytes:
    image = Image.new("RGB", (32, 32), "black")
    x = 4 + (i * 5) % 14
    ImageDraw.Draw(image).ellipse((x, x, x + 12, x + 12), fill=COLORS[i % len(COLORS)])
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def make_captions(workdir: Path, count: int = 24, per_shard: int = 10) -> dict:
    """A caption-stage output: shards of 32 px PNG shapes with captions."""

    def work(build: StageBuild) -> dict:
        names = []
        for start in range(0, count, per_shard):
            rows = range(start, min(count, start + per_shard))
            table = pa.table(
                {
                    "id": [f"img-{i}" for i in rows],
                    "image": [shape_png(i) for i in rows],
                    "caption": [f"a {COLORS[i % len(COLORS)]} circle" for i in rows],
                    "source": [f"fixture/{i}" for i in rows],
                }
            )
            names.append(build.write_shard(len(names), table))
        return build.finish(counts={"kept": count}, shards=names, files={"failures": "failures"})

    return build_stage(workdir, "caption", "fixture", work)


def test_autoencoder_writes_a_scaled_vae_and_held_out_error(tmp_path):
    config = load_profile("tiny-test", OVERRIDES)
    caption = make_captions(tmp_path)
    manifest = train_autoencoder(config, {"caption": caption}, str(tmp_path))
    out = tmp_path / manifest["path"]
    ids = [f"img-{i}" for i in range(24)]
    held = [i for i in ids if is_held_out(i, 0.25)]
    assert 0 < len(held) < 24
    assert manifest["counts"] == {
        "steps": 4,
        "train_images": 24 - len(held),
        "held_out_images": len(held),
    }
    info = manifest["info"]
    assert list_checkpoints(out / "checkpoints") == [4]
    vae = AutoencoderKL.from_pretrained(out / manifest["files"]["vae"])
    assert vae.config.scaling_factor == pytest.approx(info["scaling_factor"])
    # scaled latent means of the training images have unit standard deviation
    pixels = torch.stack(
        [image_to_tensor(shape_png(int(i.split("-")[1])), 32) for i in ids if i not in held]
    )
    with torch.no_grad():
        means = vae.encode(pixels).latent_dist.mean
    assert (means * vae.config.scaling_factor).std().item() == pytest.approx(1.0, rel=1e-3)
    # the held-out error is that of this VAE on exactly the held-out images
    held_pixels = torch.stack([image_to_tensor(shape_png(int(i.split("-")[1])), 32) for i in held])
    with torch.no_grad():
        recon = vae(held_pixels, sample_posterior=False).sample
    expected = torch.nn.functional.mse_loss(recon, held_pixels).item()
    assert info["held_out_mse"] == pytest.approx(expected, rel=1e-4)


def test_autoencoder_resumes_after_a_crash_to_the_same_weights(tmp_path, monkeypatch, caplog):
    config = load_profile("tiny-test", OVERRIDES)
    straight = train_autoencoder(
        config, {"caption": make_captions(tmp_path / "a")}, str(tmp_path / "a")
    )

    workdir = tmp_path / "b"
    caption = make_captions(workdir)
    real = autoencoder.save_checkpoint

    def save_then_crash(root, step, state, keep):
        real(root, step, state, keep)
        if step == 2:
            raise OSError("disk went away")

    monkeypatch.setattr(autoencoder, "save_checkpoint", save_then_crash)
    with pytest.raises(OSError):
        train_autoencoder(config, {"caption": caption}, str(workdir))
    monkeypatch.setattr(autoencoder, "save_checkpoint", real)
    with caplog.at_level(logging.INFO, logger="sdflow.autoencoder"):
        resumed = train_autoencoder(config, {"caption": caption}, str(workdir))
    assert "from the checkpoint of step 2" in caplog.text

    weights = "vae/diffusion_pytorch_model.safetensors"
    a = load_file(tmp_path / "a" / straight["path"] / weights)
    b = load_file(workdir / resumed["path"] / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight["info"]["held_out_mse"] == resumed["info"]["held_out_mse"]
    assert straight["info"]["scaling_factor"] == resumed["info"]["scaling_factor"]
    # the checkpoints record different training seconds; the fingerprint covers only the content
    assert resumed["fingerprint"] == straight["fingerprint"]


def test_autoencoder_without_training_images_is_a_user_error(tmp_path):
    from sdflow.errors import UserError

    config = load_profile("tiny-test", [*OVERRIDES[:-1], "eval.held_out_fraction=0.999"])
    caption = make_captions(tmp_path, count=3)
    with pytest.raises(UserError, match="held out"):
        train_autoencoder(config, {"caption": caption}, str(tmp_path))


def test_colour_augmentation_matches_hsv_and_torchvision_definitions():
    """Hue rotation (checked with colorsys), saturation as a blend with the image's grey (ITU-R
    601 luma, torchvision's definition) and brightness as a clamped factor; per image, with
    factors drawn from the generator in that order."""
    import colorsys

    from sdflow.config import AugmentConfig

    colours = [(220, 30, 30), (30, 170, 60), (240, 210, 30), (255, 255, 255)]
    pixels = torch.tensor(colours, dtype=torch.float32)[:, :, None, None].expand(4, 3, 2, 2)
    pixels = pixels / 127.5 - 1
    draws = torch.Generator().manual_seed(7)
    hue, sat, bright = (torch.rand(4, generator=draws) * 2 - 1 for _ in range(3))

    only_hue = autoencoder.augment_colours(
        pixels,
        torch.Generator().manual_seed(7),
        AugmentConfig(hue=0.5, saturation=0, brightness=0, probability=1),
    )
    for i, rgb in enumerate(colours):
        h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
        expected = colorsys.hsv_to_rgb((h + 0.5 * float(hue[i])) % 1.0, s, v)
        got = (only_hue[i, :, 0, 0] + 1) / 2
        assert got.tolist() == pytest.approx(expected, abs=2e-3), (rgb, float(hue[i]))
        assert torch.equal(only_hue[i], only_hue[i, :, :1, :1].expand(3, 2, 2))

    both = autoencoder.augment_colours(
        pixels,
        torch.Generator().manual_seed(7),
        AugmentConfig(hue=0, saturation=0.5, brightness=0.3, probability=1),
    )
    for i, rgb in enumerate(colours):
        x = torch.tensor(rgb) / 255
        grey = 0.2989 * x[0] + 0.587 * x[1] + 0.114 * x[2]
        saturated = ((1 + 0.5 * float(sat[i])) * x + (0.5 * -float(sat[i])) * grey).clamp(0, 1)
        expected = (saturated * (1 + 0.3 * float(bright[i]))).clamp(0, 1)
        got = (both[i, :, 0, 0] + 1) / 2
        assert got.tolist() == pytest.approx(expected.tolist(), abs=1e-5), rgb
    # with probability 0.5, the images whose fourth draw is below 0.5 are changed, the rest not
    draws = torch.Generator().manual_seed(1)
    for _ in range(3):
        torch.rand(4, generator=draws)
    changed = torch.rand(4, generator=draws) < 0.5
    assert changed.tolist() == [False, True, True, True]  # red kept, green and yellow rotated
    half = autoencoder.augment_colours(
        pixels, torch.Generator().manual_seed(1), AugmentConfig(hue=0.5, probability=0.5)
    )
    for i in range(3):  # (white has no hue to rotate)
        assert torch.allclose(half[i], pixels[i], atol=1e-6) != bool(changed[i]), i
    # switched off, the images pass through unchanged
    off = AugmentConfig(hue=0, saturation=0, brightness=0)
    assert torch.allclose(autoencoder.augment_colours(pixels, draws, off), pixels, atol=1e-6)


def test_unseen_colour_and_shape_errors_are_this_vaes_on_the_probe_images(tmp_path):
    from sdflow.data.sources.demo import unseen_samples

    config = load_profile("tiny-test", [*OVERRIDES, "autoencoder.unseen_samples=6"])
    manifest = train_autoencoder(config, {"caption": make_captions(tmp_path)}, str(tmp_path))
    vae = AutoencoderKL.from_pretrained(tmp_path / manifest["path"] / manifest["files"]["vae"])
    for kind in ("colour", "shape"):
        images = []
        for image in unseen_samples(kind, 6, 64):  # drawn at 2x, resized like training images
            out = io.BytesIO()
            image.save(out, format="PNG")
            images.append(image_to_tensor(out.getvalue(), 32))
        pixels = torch.stack(images)
        with torch.no_grad():
            recon = vae(pixels, sample_posterior=False).sample
        expected = torch.nn.functional.mse_loss(recon, pixels).item()
        assert manifest["info"][f"unseen_{kind}_mse"] == pytest.approx(expected, rel=1e-4)


def test_augment_settings_are_checked():
    from sdflow.errors import UserError

    with pytest.raises(UserError, match="autoencoder.augment.hue"):
        load_profile("tiny-test", ["autoencoder.augment.hue=0.7"])
