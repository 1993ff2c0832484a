"""FID and CLIP score for the evaluate stage, built on torchmetrics, working offline.

FID uses torchmetrics' `FrechetInceptionDistance` with one of two feature networks:

- `inception`: the standard 2048-d Inception-v3 pool features (torch-fidelity's weights, looked up
  in the torch hub cache first; we never wait on a network that is not there). Images are resized
  with `antialias=False`, the TF-1.x-compatible bilinear resize that published FIDs were made with.
- `random-cnn`: a fixed-seed, randomly initialised small conv net (`RandomCNNFeatures`). It needs no
  download, so tiny CPU profiles can still compare trained vs baseline, but its numbers mean
  something only next to other random-cnn numbers from the same code.

CLIP score uses torchmetrics' `CLIPScore` with a model/processor pair loaded by us (a local
directory or a cached hub name), adapted to transformers 5, whose `get_*_features` return output
objects instead of tensors.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.multimodal.clip_score import CLIPScore

from sdflow.config import EvalConfig
from sdflow.errors import UserError
from sdflow.gpuslots import torch_device

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
)
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
        """uint8 [N, 3, H, W] (what torchmetrics passes) -> float [N, num_features]."""
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


@dataclass
class Scorers:
    """The metrics every model is scored with; FID keeps the real images' statistics throughout."""

    fid: FrechetInceptionDistance
    clip: CLIPScore | None
    device: torch.device

    def add_generated(self, images: torch.Tensor, prompts: list[str]) -> None:
        images = images.to(self.device)
        self.fid.update(images, real=False)
        self.add_prompted(images, prompts)

    def add_prompted(self, images: torch.Tensor, prompts: list[str]) -> None:
        if self.clip is not None:
            self.clip.update(images.to(self.device), prompts)

    def reset(self) -> None:
        self.fid.reset()  # forgets the previous model's generated images, keeps the real ones
        if self.clip is not None:
            self.clip.reset()


def make_scorers(config: EvalConfig) -> Scorers:
    """FID (and CLIP score when `clip_model` is set), on the GPU when there is one."""
    device = torch_device()
    fid = make_fid(config.fid_features).to(device)
    clip = make_clip_score(config.clip_model).to(device) if config.clip_model else None
    return Scorers(fid, clip, device)


def fid_label(features: str) -> str:
    """How metrics.json names the feature network."""
    return INCEPTION_LABEL if features == "inception" else RANDOM_CNN_LABEL


def fid_note(features: str) -> str:
    """What a reader of metrics.json must know before comparing this FID with another."""
    same = "the same fid_samples, guidance_scale, scheduler, num_inference_steps and resolution"
    if features == "inception":
        return (
            "torchmetrics FID on Inception-v3 pool3 features with antialias=False (the TF-style "
            f"resize published FIDs use); compare only runs with {same}. Stable FIDs need "
            "thousands of samples."
        )
    return (
        "FID on a fixed random conv net's features: offline, for trained-vs-baseline and "
        f"run-vs-run comparisons within sdflow with {same}; never compare with published FIDs."
    )


def make_fid(features: str) -> FrechetInceptionDistance:
    """FID that keeps its real-image statistics across `reset()`: one real set, many models.

    Both networks take uint8 images, so `normalize=False`: callers pass uint8 [N, 3, H, W].
    """
    if features == "random-cnn":
        return FrechetInceptionDistance(
            feature=RandomCNNFeatures(), reset_real_features=False, normalize=False
        )
    if features == "inception":
        weights = ensure_inception_weights()
        return FrechetInceptionDistance(
            feature=2048,
            reset_real_features=False,
            normalize=False,
            antialias=False,  # TF-1.x-style resize: what published FIDs were computed with
            feature_extractor_weights_path=str(weights),
        )
    raise ValueError(f"unknown FID features {features!r}: use 'inception' or 'random-cnn'")


def fid_value(metric: FrechetInceptionDistance) -> float:
    """The FID as a float; tiny negative values are rounding noise of a distance that is >= 0."""
    return max(float(metric.compute()), 0.0)


def inception_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def ensure_inception_weights() -> Path:
    """The Inception weights: from the torch hub cache, else downloaded once, else a UserError."""
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
    _check_weights_safe(path)
    return path


def _download(url: str, path: Path) -> None:
    """Download to a temp file beside `path`, then rename: a cut download never looks complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with httpx.stream("GET", url, timeout=DOWNLOAD_TIMEOUT_S, follow_redirects=True) as resp:
            resp.raise_for_status()
            with open(tmp, "wb") as fh:
                for chunk in resp.iter_bytes():
                    fh.write(chunk)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_weights_safe(path: Path) -> None:
    """torch-fidelity loads the file with weights_only=False: make sure it holds plain tensors."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"{path} is not a plain tensor checkpoint ({exc}); delete it so it is fetched again, "
            "or set eval.fid_features: random-cnn."
        ) from exc


class _FeatureTensors(nn.Module):
    """CLIPModel whose get_*_features return tensors, as torchmetrics 1.9 expects.

    transformers 5 returns `BaseModelOutputWithPooling` (projected features in `pooler_output`).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _as_tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return _as_tensor(out)


def _as_tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _TruncatingProcessor:
    """Truncate long captions in the tokenizer, so each keeps its end-of-text token.

    torchmetrics cuts token ids after tokenising, which drops the EOS token CLIP pools from.
    """

    def __init__(self, processor, max_length: int):
        self.processor = processor
        self.max_length = max_length

    def __call__(self, *args, **kwargs):
        if kwargs.get("text") is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        return self.processor(*args, **kwargs)


def make_clip_score(clip_model: str) -> CLIPScore:
    """CLIPScore (100 x cosine, >= 0) with the model from a local directory or a cached hub name.

    torchmetrics 1.9 accepts only names containing "openai" (and a few others) as strings, so we
    pass a loader callable, which works for any local directory too.
    """
    return CLIPScore(model_name_or_path=lambda: load_clip(clip_model))


def load_clip(clip_model: str):
    """(model, processor) for CLIPScore; a missing or unloadable model is a UserError."""
    from transformers import CLIPModel, CLIPProcessor

    local = Path(clip_model).expanduser()
    if _looks_local(clip_model) and not local.is_dir():
        raise UserError(f"eval.clip_model {clip_model!r} is not a directory.")
    source = str(local) if local.is_dir() else clip_model
    try:
        model = CLIPModel.from_pretrained(source)
        processor = CLIPProcessor.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"eval.clip_model {clip_model!r} could not be loaded ({exc}). Give a local directory "
            "holding a CLIPModel and its CLIPProcessor (save_pretrained), or unset eval.clip_model."
        ) from exc
    model.eval()
    max_length = model.config.text_config.max_position_embeddings
    return _FeatureTensors(model), _TruncatingProcessor(processor, max_length)


def _looks_local(name: str) -> bool:
    """A path rather than a hub name ("org/name")."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def to_uint8(images: np.ndarray) -> torch.Tensor:
    """Pipeline output (float NHWC in [0, 1]) -> uint8 NCHW, the input both metrics take."""
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
