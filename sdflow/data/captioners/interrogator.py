"""clip-interrogator captions: `caption.backend: clip-interrogator` (the optional `caption` extra).

Run with `sdflow run clip-interrogator-fast --only download,filter,caption`. The base captions
come from sdflow's batched `BlipCaptioner` (clip-interrogator captions one image at a time);
clip-interrogator then ranks its term lists against each image with CLIP, in
`caption.interrogator.mode` (fast | classic | best | negative; negative needs no caption model).

Models: `caption.model` (BLIP) is always built here and handed to clip-interrogator's `Config`
after construction. `caption.interrogator.clip_model` is either an open_clip
'architecture/pretrained-tag' name, which clip-interrogator loads (and, online, downloads its
precomputed term embeddings for), or a local open_clip directory, which is built here and handed
in with `download_cache=False`, so nothing reaches for the network. Term embeddings are cached
under `<workdir>/cache/clip-interrogator`, named after the CLIP weights' hash.

Written against clip-interrogator 0.6.0 (2023) with open_clip 3.x and transformers 5. Two narrow
adaptations, both in this module: `Interrogator.load_clip_model` looks its tokenizer up by the
model name, which for a handed-in model is only a label, so `LocalTokenizerInterrogator` keeps the
local directory's tokenizer; and its term chains raise IndexError when they run out of phrases
(short term lists), so `chain_limit` caps their length.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

from PIL import Image

from sdflow.config import CaptionConfig
from sdflow.data.captioners import INSTALL_EXTRA, select_device
from sdflow.data.captioners.blip import BlipCaptioner
from sdflow.errors import UserError
from sdflow.models.files import weights_hash
from sdflow.store.fingerprint import hash_tree

TERM_FILES = ("artists.txt", "flavors.txt", "mediums.txt", "movements.txt", "negative.txt")
OPEN_CLIP_NAME = re.compile(r"^[\w.-]+/[\w.@-]+$")  # 'ViT-L-14/openai': what Config splits on "/"
MAX_CHAIN = 32  # clip-interrogator's default max_flavors for its chains


def import_interrogator() -> tuple[Any, Any]:
    """The clip_interrogator and open_clip modules, or a UserError naming the extra."""
    try:
        import clip_interrogator
        import open_clip
    except ImportError as exc:
        raise UserError(
            f"caption.backend 'clip-interrogator' needs the optional caption extra "
            f"({exc.name} is not installed). Install it with: {INSTALL_EXTRA}"
        ) from None
    return clip_interrogator, open_clip


def local_clip_dir(name: str) -> Path | None:
    """The directory `clip_model` names, or None for an open_clip 'architecture/tag' name."""
    path = Path(name).expanduser()
    if path.is_dir() or name.startswith(("/", ".", "~")):
        if not (path / "open_clip_config.json").is_file():
            raise UserError(
                f"caption.interrogator.clip_model {name!r} is not an open_clip model directory "
                "(open_clip_config.json and weights, as open_clip's local-dir: loads)."
            )
        return path.resolve()
    if not OPEN_CLIP_NAME.match(name):
        raise UserError(
            f"caption.interrogator.clip_model {name!r} is neither a local open_clip directory nor "
            "an open_clip 'architecture/pretrained-tag' name such as ViT-L-14/openai."
        )
    return None


def clip_identity(name: str) -> str:
    local = local_clip_dir(name)
    return f"open_clip:{name}" if local is None else weights_hash(str(local), None)


def term_dir(data_path: str | None) -> Path:
    """The term-list directory, checked for every list clip-interrogator reads."""
    if data_path is None:
        import clip_interrogator

        return Path(clip_interrogator.__file__).parent / "data"
    path = Path(data_path).expanduser().resolve()
    missing = [name for name in TERM_FILES if not (path / name).is_file()]
    if missing:
        raise UserError(
            f"caption.interrogator.data_path {data_path!r} lacks {', '.join(missing)}: it needs "
            f"one term per line in each of {', '.join(TERM_FILES)}."
        )
    return path


def terms_identity(data_path: str | None) -> str:
    if data_path is None:  # the bundled lists change only with the package
        return f"clip-interrogator {version('clip-interrogator')}"
    return hash_tree(term_dir(data_path))


class InterrogatorCaptioner:
    """BLIP captions for a batch, then clip-interrogator's CLIP ranking image by image."""

    needs_images = True

    def __init__(self, cfg: CaptionConfig, cache_dir: Path):
        import_interrogator()
        self.mode = cfg.interrogator.mode
        self.blip = None if self.mode == "negative" else BlipCaptioner(cfg, cache_dir)
        self.interrogator = build_interrogator(cfg, self.blip, cache_dir)
        self.limit = chain_limit(self.interrogator, self.mode)

    def caption(
        self, images: list[Image.Image] | None, existing: list[str | None]
    ) -> list[str | None]:
        images = images or []
        bases = self.blip.caption(images, existing) if self.blip else [None] * len(images)
        return [self.interrogate(image, base) for image, base in zip(images, bases, strict=True)]

    def interrogate(self, image: Image.Image, base: str | None) -> str | None:
        ci = self.interrogator
        if self.mode == "negative":
            return ci.interrogate_negative(image, max_flavors=self.limit)
        if not base:  # never its unbatched generate_caption: `on_missing` decides
            return None
        if self.mode == "fast":
            return ci.interrogate_fast(image, caption=base)
        if self.mode == "classic":
            return ci.interrogate_classic(image, caption=base)
        return ci.interrogate(image, max_flavors=self.limit, caption=base)


def build_interrogator(cfg: CaptionConfig, blip: BlipCaptioner | None, cache_dir: Path) -> Any:
    """clip-interrogator's Interrogator with our models handed in where we have them."""
    ci, open_clip = import_interrogator()
    device = select_device()
    settings = {
        "caption_model_name": None,  # the caption model is handed in (or unused: negative)
        "cache_path": str(cache_dir / "clip-interrogator"),
        "data_path": str(term_dir(cfg.interrogator.data_path)),
        "device": device.type,
        "quiet": True,
    }
    local = local_clip_dir(cfg.interrogator.clip_model)
    if local is None:  # a name: clip-interrogator loads it (online), with its cached embeddings
        config = ci.Config(clip_model_name=cfg.interrogator.clip_model, **settings)
        tokenizer = None
    else:
        # The name labels the term-embedding cache files: the weights hash keeps them apart.
        label = f"sdflow-{weights_hash(str(local), None)[:16]}/local"
        config = ci.Config(clip_model_name=label, download_cache=False, **settings)
        precision = "fp16" if device.type == "cuda" else "fp32"  # as clip-interrogator loads
        model, _, preprocess = open_clip.create_model_and_transforms(
            f"local-dir:{local}", precision=precision, device=device
        )
        config.clip_model, config.clip_preprocess = model.eval(), preprocess
        tokenizer = open_clip.get_tokenizer(f"local-dir:{local}")
    if blip is not None:
        config.caption_model, config.caption_processor = blip.model, blip.processor
    if tokenizer is None:
        return ci.Interrogator(config)
    return _local_tokenizer_class(ci.Interrogator)(config, tokenizer)


@cache
def _local_tokenizer_class(base: type) -> type:
    class LocalTokenizerInterrogator(base):
        """Keeps the local CLIP directory's tokenizer: `load_clip_model` sets `self.tokenize` from
        `open_clip.get_tokenizer(<name>)`, and our name is a label open_clip does not know (it
        falls back to its default tokenizer, which is wrong for models with their own)."""

        def __init__(self, config: Any, tokenizer: Any):
            self._local_tokenizer = tokenizer
            super().__init__(config)

        @property
        def tokenize(self) -> Any:
            return self._local_tokenizer

        @tokenize.setter
        def tokenize(self, looked_up: Any) -> None:
            pass  # the one looked up by name is discarded

    return LocalTokenizerInterrogator


def chain_limit(ci: Any, mode: str) -> int:
    """Longest term chain clip-interrogator can build from its phrases: its `chain` removes one
    phrase per step and raises IndexError once none are left (short lists)."""
    count = ci.config.flavor_intermediate_count
    if mode == "negative":
        phrases = max(min(count, len(set(ci.flavors.labels))), len(set(ci.negative.labels)))
    else:
        tables = (ci.artists, ci.flavors, ci.mediums, ci.movements, ci.trendings)
        phrases = min(count, max(len(set(t.labels)) for t in tables))
    return max(1, min(MAX_CHAIN, phrases - 1))
