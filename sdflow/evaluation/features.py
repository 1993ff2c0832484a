"""Image feature networks for the distribution metrics, and the images they take.

Every feature-based metric (FID, KID, precision/recall, density/coverage) is computed from ONE pass
of one network over each image set (`FeatureNet`), never one pass per metric:

- `inception`: the standard 2048-d Inception-v3 pool features (torch-fidelity's weights, the ones
  torchmetrics uses), with `antialias=False`, the TF-1.x-compatible bilinear resize published FIDs
  were made with. The weights file is looked up where torch hub keeps checkpoints, downloaded once
  when absent, and used only when its SHA-256 starts with the prefix its published name carries
  (`...-6726825d.pth`, torch hub's convention): a truncated or foreign file is refused.
- `random-cnn`: a fixed-seed, randomly initialised small conv net (`RandomCNNFeatures`). It needs no
  download, so tiny CPU profiles can still compare models, but its numbers mean something only next
  to other random-cnn numbers from the same code.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from pathlib import Path

import httpx
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sdflow.errors import UserError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
)
# The published file's full SHA-256 (95,628,359 bytes). torch hub names checkpoints
# `<name>-<sha256 prefix>.<ext>`, but 32 bits is no check against a crafted file, and the file is a
# pickle that torch-fidelity loads: only these exact bytes are loaded.
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_LABEL = "inception-v3 pool3 2048 (torch-fidelity weights, antialias=False)"
RANDOM_CNN_LABEL = "random-cnn (offline; not comparable to published FID)"
DOWNLOAD_TIMEOUT_S = 10.0


class RandomCNNFeatures(nn.Module):
    """A fixed random conv net whose pooled activations stand in for Inception features offline.

    Randomly initialised CNN embeddings are a known stand-in where no pretrained network fits the
    data (Naeem et al. 2020, arXiv:2002.09797, compare metrics on them). Features at several
    scales make colour (a 4x4 colour layout of the input), local shape (first two conv stages) and
    larger structure (third stage) all count. The weights are
    drawn from our own seeded generator, so they do not change with torch's default init.
    """

    def __init__(self, seed: int = 0, size: int = 64):
        super().__init__()
        self.size = size
        generator = torch.Generator().manual_seed(seed)
        widths = [3, 16, 32, 64]
        for i, (cin, cout) in enumerate(zip(widths, widths[1:], strict=False)):
            # He-normal init keeps the activations' scale similar from stage to stage.
            std = math.sqrt(2.0 / (cin * 9))
            self.register_buffer(f"w{i}", torch.randn(cout, cin, 3, 3, generator=generator) * std)
        self.num_features = 3 * 16 + 16 + 32 * 4 + 64

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> float [N, num_features]."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected uint8 [N, 3, H, W] images, got {images.dtype} {tuple(images.shape)}"
            )
        x = images.float() / 127.5 - 1.0
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        colour = F.adaptive_avg_pool2d(x, 4).flatten(1)
        h1 = F.relu(F.conv2d(x, self.w0, stride=2, padding=1))
        h2 = F.relu(F.conv2d(h1, self.w1, stride=2, padding=1))
        h3 = F.relu(F.conv2d(h2, self.w2, stride=2, padding=1))
        pooled = [h1.mean((2, 3)), F.adaptive_avg_pool2d(h2, 2).flatten(1), h3.mean((2, 3))]
        return torch.cat([colour, *pooled], dim=1)


class FeatureNet:
    """One feature network, its label for metrics.json, and the device it runs on."""

    def __init__(self, name: str, device: torch.device | None = None):
        self.name = name
        self.label = feature_label(name)
        self.device = device or torch.device("cpu")
        self.net = make_feature_network(name).to(self.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> float64 [N, D] on the CPU (small; the metrics run there)."""
        with torch.no_grad():
            return self.net(images.to(self.device)).reshape(len(images), -1).double().cpu()


def make_feature_network(name: str) -> nn.Module:
    """The network behind `eval.fid_features`; Inception loads its hash-checked weights."""
    if name == "random-cnn":
        return RandomCNNFeatures().eval()
    if name == "inception":
        from torchmetrics.image.fid import NoTrainInceptionV3

        weights = ensure_inception_weights()
        return NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=str(weights),
            antialias=False,  # TF-1.x-style resize: what published FIDs were computed with
        )
    raise ValueError(f"unknown eval.fid_features {name!r}: use 'inception' or 'random-cnn'")


def feature_label(name: str) -> str:
    """How metrics.json names the feature network."""
    return INCEPTION_LABEL if name == "inception" else RANDOM_CNN_LABEL


def feature_note(name: str) -> str:
    """What a reader of metrics.json must know before comparing these numbers with others."""
    same = "the same fid_samples, guidance_scale, scheduler, num_inference_steps and resolution"
    if name == "inception":
        return (
            "torchmetrics FID on Inception-v3 pool3 features with antialias=False (the TF-style "
            f"resize published FIDs use); compare only runs with {same}. Stable FIDs need "
            "thousands of samples."
        )
    return (
        "FID on a fixed random conv net's features: offline, for trained-vs-baseline and "
        f"run-vs-run comparisons within sdflow with {same}; never compare with published FIDs."
    )


def inception_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def ensure_inception_weights() -> Path:
    """The Inception weights from the torch hub cache, else downloaded once; hash-checked."""
    path = inception_weights_path()
    if not path.is_file():
        try:
            _download(INCEPTION_URL, path)
        except (httpx.HTTPError, OSError) as exc:
            raise UserError(
                f"eval.fid_features is 'inception', but its weights {INCEPTION_FILE} are not in "
                f"{path.parent} and could not be downloaded ({exc}). Put the file there (from "
                f"{INCEPTION_URL}), or set eval.fid_features: random-cnn for an offline FID "
                "that is comparable only between runs of sdflow, not to published numbers."
            ) from exc
    with open(path, "rb") as fh:
        _check_digest(hashlib.file_digest(fh, "sha256").hexdigest(), str(path), "delete it")
    return path


def _check_digest(digest: str, what: str, remedy: str) -> None:
    """A UserError unless `digest` is the published file's SHA-256, every digit of it."""
    if digest != INCEPTION_SHA256:
        raise UserError(
            f"{what} is not the published Inception weights file: its SHA-256 is {digest}, the "
            f"published one is {INCEPTION_SHA256}. It is "
            f"truncated, corrupted or another file: {remedy} so it is fetched again (from "
            f"{INCEPTION_URL}), or set eval.fid_features: random-cnn."
        )


def _download(url: str, path: Path) -> None:
    """Download to a temp file beside `path`, check its hash, then rename: a cut or wrong
    download never lands where torch hub looks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with httpx.stream("GET", url, timeout=DOWNLOAD_TIMEOUT_S, follow_redirects=True) as resp:
            resp.raise_for_status()
            with open(tmp, "wb") as fh:
                for chunk in resp.iter_bytes():
                    fh.write(chunk)
                    digest.update(chunk)
        _check_digest(digest.hexdigest(), f"The download from {url}", "check the URL and retry")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def to_uint8(images: np.ndarray) -> torch.Tensor:
    """Pipeline output (float NHWC in [0, 1]) -> uint8 NCHW, the input every metric takes."""
    array = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def decode_image(data: bytes, resolution: int) -> torch.Tensor:
    """Encoded image -> uint8 [3, R, R], centre-cropped square (keep_ratio shards vary in shape)."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
        if side != resolution:
            img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()
