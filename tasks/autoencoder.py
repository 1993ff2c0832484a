"""Autoencoder stage: train the VAE from scratch on the training images (when no VAE is given).

Run it with `sdflow run scratch-small --only autoencoder`; it runs only when `config.needs_autoencoder()`
(model.init scratch and no model.vae). The loss is the reconstruction MSE (+ `l1_weight` * L1) plus
`kl_weight` * KL of the latent distribution, on a fresh latent sample each step. Checkpoints go into
the stage's partial directory every `autoencoder.checkpoint_every` steps, so a retry resumes there
and reaches the same weights. Output `vae/` (diffusers AutoencoderKL, safetensors) with
`scaling_factor` = 1 / std of the latent means of training images, so latents have unit variance
(SD's 0.18215 was found the same way); info `held_out_mse` is the reconstruction error on held-out
images (`eval.held_out_fraction`), which are never trained on.

Colour augmentation (`autoencoder.augment`, off by default): a share of the training images gets
a random hue rotation and saturation and brightness factors, drawn from the stage's seeded
generator (so a resumed run draws the same ones), so the VAE can learn colours its data never
shows and a later fine-tune can teach them. Info `unseen_colour_mse` / `unseen_shape_mse` measure
that: the reconstruction error on generated demo shapes in colours the demo set lacks (purple,
orange) and on a shape it lacks (a cross), in the same units as `held_out_mse`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from sdflow.config import AugmentConfig, AutoencoderConfig, RunConfig
from sdflow.data.imaging import encode_image
from sdflow.data.sources.demo import unseen_samples
from sdflow.errors import UserError
from sdflow.models.components import build_vae, image_to_tensor
from sdflow.models.files import save_component
from sdflow.ops.gpuslots import torch_device
from sdflow.ops.orchestration import stage_task
from sdflow.store.checkpoints import load_latest, prune_checkpoints, save_checkpoint
from sdflow.store.fingerprint import code_version
from sdflow.store.splits import is_held_out
from sdflow.store.stageio import Manifest, StageBuild, build_stage, read_shards, stage_key
from sdflow.training.latent_data import CaptionedImages
from sdflow.training.schedules import EpochOrder, StepBatches, collate

CHECKPOINTS = "checkpoints"
log = logging.getLogger("sdflow.autoencoder")


def autoencoder_key(config: RunConfig, upstream: dict[str, Manifest | None]) -> str:
    settings = {
        "autoencoder": config.autoencoder.model_dump(),
        "vae": config.model.model_dump(include={"vae_config", "seed"}),
        "resolution": config.download.resolution,
        "held_out_fraction": config.eval.held_out_fraction,
    }
    return stage_key("autoencoder", settings, [upstream.get("caption")], code_version(__name__))


def train_autoencoder(
    config: RunConfig, upstream: dict[str, Manifest | None], workdir: str
) -> Manifest:
    key = autoencoder_key(config, upstream)
    return build_stage(workdir, "autoencoder", key, lambda b: _build(b, config, upstream, workdir))


train_autoencoder_task = stage_task("autoencoder", autoencoder_key)(train_autoencoder)


@dataclass
class Progress:
    step: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


def _build(
    build: StageBuild, config: RunConfig, upstream: dict[str, Manifest | None], workdir: str
) -> Manifest:
    caption = upstream.get("caption")
    if not caption:
        raise UserError("The autoencoder stage needs the caption stage's output; run it first.")
    images = CaptionedImages(
        workdir, caption, config.download.resolution, config.eval.held_out_fraction
    )
    if len(images) == 0:
        raise UserError(
            "No training images for the autoencoder: every captioned sample is held out "
            f"(eval.held_out_fraction = {config.eval.held_out_fraction})."
        )
    device = torch_device()
    vae = build_vae(config.model).to(device)
    root = build.path / CHECKPOINTS
    progress = fit_vae(vae, images, config.autoencoder, root, config.train.keep_checkpoints)
    vae.eval()
    held_out = held_out_batches(workdir, caption, config)
    held_out_mse, held_out_count = reconstruction_mse(vae, held_out)
    unseen = {
        f"unseen_{kind}_mse": reconstruction_mse(vae, probe_batches(kind, config))[0]
        for kind in ("colour", "shape")
    }
    scaling = latent_scaling(vae, images, config.autoencoder)
    vae.register_to_config(scaling_factor=scaling)
    save_component(vae.to("cpu"), build.path / "vae")
    prune_checkpoints(build.path / CHECKPOINTS, keep=1)
    return build.finish(
        counts={
            "steps": progress.step,
            "train_images": len(images),
            "held_out_images": held_out_count,
        },
        files={"vae": "vae", "checkpoints": CHECKPOINTS},
        info={
            "held_out_mse": held_out_mse,
            **unseen,
            "scaling_factor": scaling,
            "seconds_training": round(progress.seconds, 3),
            "final_loss": progress.losses[-1] if progress.losses else None,
        },
    )


def fit_vae(
    vae: AutoencoderKL, images: CaptionedImages, ae: AutoencoderConfig, root: Path, keep: int
) -> Progress:
    """Train to `ae.steps`, resuming from the newest checkpoint under `root`."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=ae.lr)
    generator = torch.Generator().manual_seed(ae.seed)
    progress = Progress()
    found = load_latest(root)
    if found:
        _, state = found
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["rng"]["generator"])
        progress = Progress(**state["progress"])
        log.info("Resuming autoencoder training from the checkpoint of step %d", progress.step)
    order = EpochOrder([""] * len(images), ae.batch_size, ae.seed)  # one (square) bucket
    sampler = StepBatches(order, start=progress.step, stop=ae.steps)
    device = next(vae.parameters()).device
    vae.train()
    for batch in DataLoader(images, batch_sampler=sampler, collate_fn=collate):
        started = time.monotonic()
        pixels = augment_colours(batch["pixels"], generator, ae.augment)
        loss = vae_loss(vae, pixels.to(device), generator, ae)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.step += 1
        progress.losses.append(float(loss.detach()))
        progress.seconds += time.monotonic() - started
        if progress.step % ae.checkpoint_every == 0 or progress.step == ae.steps:
            state = {
                "model": vae.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": {"generator": generator.get_state()},
                "progress": asdict(progress),
            }
            save_checkpoint(root, progress.step, state, keep=keep)
            log.info("autoencoder step %d/%d loss %.5f", progress.step, ae.steps, loss.item())
    return progress


def augment_colours(pixels: Tensor, generator: torch.Generator, augment: AugmentConfig) -> Tensor:
    """Each image with `probability`: hue rotated by U(-hue, hue) turns, saturation and
    brightness scaled by U(1 - s, 1 + s) and U(1 - b, 1 + b). Pixels in [-1, 1]; the draws
    (hue, saturation, brightness, whether) come from `generator`, in that order."""
    size = len(pixels)
    hue = (torch.rand(size, generator=generator) * 2 - 1) * augment.hue
    saturation = 1 + (torch.rand(size, generator=generator) * 2 - 1) * augment.saturation
    brightness = 1 + (torch.rand(size, generator=generator) * 2 - 1) * augment.brightness
    changed = torch.rand(size, generator=generator) < augment.probability
    images = (pixels + 1) / 2
    out = []
    for i, image in enumerate(images):
        if not changed[i]:
            out.append(image)
            continue
        if augment.hue:
            image = TF.adjust_hue(image, float(hue[i]))
        if augment.saturation:
            image = TF.adjust_saturation(image, float(saturation[i]))
        if augment.brightness:
            image = TF.adjust_brightness(image, float(brightness[i]))
        out.append(image)
    return torch.stack(out) * 2 - 1


def vae_loss(vae: AutoencoderKL, pixels: Tensor, generator: torch.Generator, ae) -> Tensor:
    """Reconstruction of a latent sample (reparameterised) + kl_weight * KL to N(0, I)."""
    posterior = vae.encode(pixels).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator).to(pixels.device)
    latents = posterior.mean + posterior.std * noise
    recon = vae.decode(latents).sample
    loss = F.mse_loss(recon, pixels)
    if ae.l1_weight:
        loss = loss + ae.l1_weight * F.l1_loss(recon, pixels)
    return loss + ae.kl_weight * posterior.kl().mean()


def held_out_batches(workdir: str, caption: Manifest, config: RunConfig) -> Iterator[Tensor]:
    """Up to `autoencoder.held_out` held-out images in [-1, 1], in batches."""
    fraction, limit = config.eval.held_out_fraction, config.autoencoder.held_out

    def images() -> Iterator[Tensor]:
        for table in read_shards(workdir, caption, columns=["id", "image"]):
            for sample_id, data in zip(
                table["id"].to_pylist(), table["image"].to_pylist(), strict=True
            ):
                if is_held_out(sample_id, fraction):
                    yield image_to_tensor(data, config.download.resolution)

    stream = islice(images(), limit)
    while batch := list(islice(stream, config.autoencoder.batch_size)):
        yield torch.stack(batch)


def probe_batches(kind: str, config: RunConfig) -> Iterator[Tensor]:
    """`autoencoder.unseen_samples` generated images of an unseen colour or shape, in [-1, 1]:
    drawn at twice the resolution and resized as training images are, in batches."""
    resolution, ae = config.download.resolution, config.autoencoder
    images = unseen_samples(kind, ae.unseen_samples, max(16, 2 * resolution), seed=ae.seed)
    tensors = [image_to_tensor(encode_image(image, "png"), resolution) for image in images]
    for start in range(0, len(tensors), ae.batch_size):
        yield torch.stack(tensors[start : start + ae.batch_size])


@torch.no_grad()
def reconstruction_mse(vae: AutoencoderKL, batches: Iterator[Tensor]) -> tuple[float | None, int]:
    """Mean squared error of decode(mean latent) against the image, over all pixels; None if none."""
    device = next(vae.parameters()).device
    total, count = 0.0, 0
    for pixels in batches:
        pixels = pixels.to(device)
        recon = vae(pixels, sample_posterior=False).sample
        total += F.mse_loss(recon, pixels, reduction="sum").item()
        count += len(pixels)
    if count == 0:
        log.warning(
            "No held-out images (eval.held_out_fraction is 0): held_out_mse is not measured"
        )
        return None, 0
    return total / (count * pixels[0].numel()), count


@torch.no_grad()
def latent_scaling(vae: AutoencoderKL, images: CaptionedImages, ae: AutoencoderConfig) -> float:
    """1 / std of the latent means of the first `scale_samples` training images."""
    device = next(vae.parameters()).device
    count = min(len(images), ae.scale_samples)
    means = []
    for start in range(0, count, ae.batch_size):
        rows = [images[i]["pixels"] for i in range(start, min(count, start + ae.batch_size))]
        means.append(vae.encode(torch.stack(rows).to(device)).latent_dist.mean.float().cpu())
    std = torch.cat(means).std().item()
    return 1.0 / std if std > 0 else 1.0
