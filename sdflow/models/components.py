"""Stable Diffusion components: built from config (scratch), loaded (pretrained), saved, hashed.

Every stage that touches a model goes through here, so a component is built, loaded and
fingerprinted the same way everywhere. Scratch components are seeded by `model.seed` inside
`torch.random.fork_rng`, so building one never disturbs the caller's random state.
"""

from __future__ import annotations

import inspect
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    UNet2DConditionModel,
)
from diffusers.models.modeling_utils import ModelMixin
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from PIL import Image
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PreTrainedModel

from sdflow.config import ModelConfig, RunConfig
from sdflow.errors import UserError
from sdflow.models.hub import pinned
from sdflow.store.stageio import Manifest, output_dir

WEIGHTS = (ModelMixin, PreTrainedModel)  # classes with weight files (variants, dtypes)
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# ---------------------------------------------------------------------------------------- scratch


def _seeded(seed: int, build: Any) -> Any:
    """Call `build()` with torch seeded to `seed`, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _check_keys(cls: type, config: dict[str, Any], key: str) -> None:
    """Unknown keys in a component config are typos: say so instead of silently dropping them."""
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise UserError(
            f"{key} has keys that {cls.__name__} does not know: {', '.join(unknown)}. "
            f"Allowed keys: {', '.join(sorted(allowed))}."
        )


def text_hidden_size(model: ModelConfig) -> int:
    """Hidden size of the scratch text encoder (CLIPTextConfig's default when not set)."""
    return int(model.text_encoder.get("hidden_size", CLIPTextConfig().hidden_size))


def build_unet(model: ModelConfig) -> UNet2DConditionModel:
    """A randomly initialised UNet from `model.unet`, seeded by `model.seed`."""
    _check_keys(UNet2DConditionModel, model.unet, "model.unet")
    cross = model.unet.get("cross_attention_dim", 1280)
    hidden = text_hidden_size(model)
    if cross != hidden:
        raise UserError(
            f"model.unet.cross_attention_dim ({cross}) must equal the text encoder's hidden size "
            f"model.text_encoder.hidden_size ({hidden}): the UNet attends to its embeddings."
        )
    latent = model.vae_config.get("latent_channels")
    if model.vae is None and latent is not None and model.unet.get("in_channels", 4) != latent:
        raise UserError(
            f"model.unet.in_channels ({model.unet.get('in_channels', 4)}) must equal "
            f"model.vae_config.latent_channels ({latent}): the UNet denoises VAE latents."
        )
    return _seeded(model.seed, lambda: UNet2DConditionModel(**model.unet))


def build_vae(model: ModelConfig) -> AutoencoderKL:
    """A randomly initialised VAE from `model.vae_config`, seeded by `model.seed`."""
    _check_keys(AutoencoderKL, model.vae_config, "model.vae_config")
    return _seeded(model.seed, lambda: AutoencoderKL(**model.vae_config))


def build_text_encoder(model: ModelConfig, vocab_size: int) -> CLIPTextModel:
    """A randomly initialised CLIP text encoder sized for the trained tokenizer, seeded."""
    settings = dict(model.text_encoder)
    for fixed in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
        if fixed in settings:
            raise UserError(f"model.text_encoder.{fixed} is set by sdflow from the tokenizer.")
    unknown = sorted(set(settings) - set(CLIPTextConfig().to_dict()))
    if unknown:  # CLIPTextConfig would keep a misspelt key as a stray attribute
        raise UserError(f"model.text_encoder has keys CLIPTextConfig does not know: {unknown}.")
    positions = max(settings.pop("max_position_embeddings", 0), model.max_token_length)
    # ids 0 and 1 are the tokenizer's start/end tokens (train_tokenizer puts them first).
    config = CLIPTextConfig(
        **settings,
        vocab_size=vocab_size,
        max_position_embeddings=positions,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return _seeded(model.seed, lambda: CLIPTextModel(config).eval())


# ---------------------------------------------------------------------------------------- loading


def is_hub_name(source: str) -> bool:
    """`org/name` that is not a local path: loaded from the Hugging Face hub (or its cache)."""
    local = source.startswith(("/", ".", "~")) or Path(source).exists()
    return not local and bool(HUB_NAME.match(source))


def absolute_source(source: str) -> str:
    """A hub name as it is; a local path made absolute, so it means the same from any cwd."""
    return source if is_hub_name(source) else str(Path(source).expanduser().resolve())


def _same(source: str, configured: str | None) -> bool:
    return configured is not None and absolute_source(source) == absolute_source(configured)


def _config_key(source: str, model: ModelConfig) -> str:
    if _same(source, model.vae):
        return "model.vae"
    if _same(source, model.pretrained):
        return "model.pretrained"
    return "an upstream stage output"


def load_component(
    source: str,
    subfolder: str | None,
    cls: Any,
    model: ModelConfig,
    dtype: torch.dtype | None = None,
    quantization: Any = None,
) -> Any:
    """`cls.from_pretrained` from a local dir or a hub name; errors name the config key.
    `quantization`: a diffusers / transformers quantization config (`sdflow.models.quantize`).

    Weights load from safetensors only, unless `model.allow_pickle_weights` (a pickle runs code
    when it is loaded): a local directory holding only pickled weights is refused before anything
    is read, and a directory with safetensors never falls back to a pickle beside them."""
    kwargs: dict[str, Any] = {"subfolder": subfolder} if subfolder else {}
    pretrained = _same(source, model.pretrained)
    kwargs.update(load_revision(source, model))  # exactly the commit the stage keys name
    if pretrained and model.variant and issubclass(cls, WEIGHTS):
        kwargs["variant"] = model.variant
    if issubclass(cls, WEIGHTS):
        kwargs["use_safetensors"] = _use_safetensors(source, subfolder, model)
    if dtype is not None:
        kwargs["torch_dtype" if issubclass(cls, ModelMixin) else "dtype"] = dtype
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if is_hub_name(source):
        try:
            return cls.from_pretrained(source, **kwargs)
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise UserError(
                f"{_config_key(source, model)} is {source!r}: not a local directory, and the hub "
                f"has no such model or revision ({type(exc).__name__})."
            ) from None
    path = Path(source).expanduser()
    where = path / subfolder if subfolder else path
    if not where.is_dir():
        raise UserError(
            f"{_config_key(source, model)} points to {where}, which is not a directory. "
            f"Give a diffusers model directory (with {subfolder or 'a config'} inside) "
            "or a hub name."
        )
    try:
        return cls.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"Could not load {cls.__name__} from {where} ({_config_key(source, model)}): {exc}"
        ) from None


def load_revision(source: str, model: ModelConfig) -> dict[str, str]:
    """The `revision=<commit>` a hub source loads at (`model.revision` for `model.pretrained`,
    `main` for another hub name), or nothing for a local directory."""
    revision = model.revision if _same(source, model.pretrained) else None
    return pinned(source, revision, is_hub_name(source))


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _use_safetensors(source: str, subfolder: str | None, model: ModelConfig) -> bool | None:
    """True (safetensors or nothing) unless pickles are allowed; then None (the library prefers
    safetensors) for a hub model, and True for a local one that has safetensors."""
    where = Path(source).expanduser() / (subfolder or "")
    local = not is_hub_name(source) and where.is_dir()
    files = [p.name for p in where.iterdir() if p.is_file()] if local else []
    has_safetensors = any(name.endswith(".safetensors") for name in files)
    if model.allow_pickle_weights:
        return True if has_safetensors else None
    if local and not has_safetensors and any(n.endswith(PICKLE_SUFFIXES) for n in files):
        raise UserError(
            f"{where} holds its weights only as pickles ({', '.join(sorted(files))}); a pickle "
            "can run code when it is loaded. Convert the model to safetensors, or, for a model "
            "from a source you trust, set model.allow_pickle_weights: true."
        )
    return True


@dataclass
class ComponentSources:
    """Where each component of one run comes from: an absolute directory or a hub name."""

    vae: str
    vae_subfolder: str | None
    text_encoder: str | None  # None only before the latents stage has built the scratch encoder
    text_encoder_subfolder: str | None
    tokenizer: str | None
    tokenizer_subfolder: str | None
    unet: str | None  # None: build from model.unet (scratch)
    unet_subfolder: str | None
    scheduler: str | None  # None: the standard SD noise schedule


def _vae_source(config: RunConfig, upstream: dict[str, Manifest | None], workdir: str):
    model = config.model
    trained = upstream.get("autoencoder")
    if trained:
        return str(output_dir(workdir, trained) / trained["files"]["vae"]), None
    if model.vae:
        # a whole pipeline given as model.vae: use its vae/ folder
        vae = absolute_source(model.vae)
        nested = not is_hub_name(vae) and (Path(vae) / "vae" / "config.json").is_file()
        return vae, "vae" if nested else None
    if model.pretrained:
        return absolute_source(model.pretrained), "vae"
    raise UserError(
        "No VAE: model.init is 'scratch' with neither model.vae nor a finished autoencoder stage. "
        "Set model.vae, or run the autoencoder stage first."
    )


def component_sources(
    config: RunConfig, upstream: dict[str, Manifest | None], workdir: str
) -> ComponentSources:
    """Resolve every component's source from the config and the upstream manifests."""
    model = config.model
    vae, vae_sub = _vae_source(config, upstream, workdir)
    if model.init == "pretrained":
        base = absolute_source(model.pretrained)
        return ComponentSources(
            vae, vae_sub, base, "text_encoder", base, "tokenizer", base, "unet", base
        )
    latents = upstream.get("latents")
    text = tok = None
    if latents:
        base = output_dir(workdir, latents)
        text = str(base / latents["files"]["text_encoder"])
        tok = str(base / latents["files"]["tokenizer"])
    return ComponentSources(vae, vae_sub, text, None, tok, None, None, None, None)


# ------------------------------------------------------------------------------------ encode, save


def encode_images(vae: AutoencoderKL, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """Latent distribution (mean, std) of images in [-1, 1], before `scaling_factor`."""
    param = next(vae.parameters())
    dist = vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist
    return dist.mean, dist.std


def encode_prompts(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]
) -> Tensor:
    """Text embeddings [B, L, D] exactly as StableDiffusionPipeline computes them for a prompt."""
    ids = tokenize_prompts(tokenizer, prompts)
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device))[0]


def tokenize_prompts(tokenizer: CLIPTokenizer, prompts: list[str]) -> Tensor:
    """Token ids [B, L] as StableDiffusionPipeline feeds them to the text encoder (no mask)."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def image_to_tensor(data: bytes, resolution: int) -> Tensor:
    """Encoded image bytes -> [3, H, W] in [-1, 1], resized and centre-cropped to `resolution`."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        if image.size != (resolution, resolution):
            scale = resolution / min(image.size)
            size = (
                max(resolution, round(image.width * scale)),
                max(resolution, round(image.height * scale)),
            )
            image = image.resize(size, Image.Resampling.BICUBIC)
            left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
            image = image.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() / 127.5 - 1.0


# ------------------------------------------------------------------------------------ fingerprints
