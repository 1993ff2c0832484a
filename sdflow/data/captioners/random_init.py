"""Randomly initialised caption models, saved the way pretrained ones are: for offline tests and
`bench/caption.py`.

`save_random_blip` writes a BLIP directory (weights, a BERT-style tokenizer over given words,
image processor) that `caption.model` can point to; `save_random_open_clip` writes an open_clip
local directory (open_clip_config.json + open_clip_model.safetensors) for
`caption.interrogator.clip_model`. Weights are seeded and random: the captions are nonsense, the
architectures, files and code paths are the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BertTokenizerFast,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    OPTConfig,
    PreTrainedTokenizerFast,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_blip_config(vocab_size: int, image_size: int = 32) -> BlipConfig:
    """A BLIP small enough for CPU tests (one layer per tower, width 32). Initialised wider than
    BLIP's 0.02, so that its random captions differ from image to image."""
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    layers["initializer_range"] = 0.2
    text = {**layers, "num_attention_heads": 2, "max_position_embeddings": 64}
    ids = {"pad_token_id": 0, "bos_token_id": 1, "sep_token_id": 2, "eos_token_id": 2}
    return BlipConfig(
        text_config={**text, "vocab_size": vocab_size, **ids},
        vision_config={
            **layers,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=16,
        initializer_range=0.2,
    )


def blip_vocabulary(config: BlipConfig, words: list[str]) -> dict[str, int]:
    """A BERT-style vocabulary filling `config`'s ids: special tokens where the config expects
    them, then `words`, then filler tokens up to the vocabulary size."""
    text = config.text_config
    size = text.vocab_size
    fixed = {"[PAD]": text.pad_token_id, "[DEC]": text.bos_token_id, "[SEP]": text.sep_token_id}
    free = (i for i in range(size) if i not in fixed.values())
    for token in ("[UNK]", "[CLS]", "[MASK]"):
        fixed[token] = next(free)
    tokens = iter([*words, *(f"token{i}" for i in range(size))])
    vocab = {t: i for t, i in fixed.items() if i is not None and i < size}
    if len(vocab) < len(fixed):
        raise ValueError(f"BLIP text ids {fixed} do not fit a vocabulary of {size}")
    vocab.update({next(tokens): i for i in free})
    return vocab


def save_random_blip(
    out_dir: Path, config: BlipConfig, words: list[str], seed: int = 0, never_end: bool = True
) -> Path:
    """Save a seeded random BLIP with its processor; `never_end` bans special tokens from the
    output, so every caption is `max_new_tokens` words long (nonempty tests, fixed-length bench)."""
    vocab = blip_vocabulary(config, words)
    tokenizer = BertTokenizerFast(vocab=vocab, bos_token="[DEC]")
    size = config.vision_config.image_size
    images = BlipImageProcessor(size={"height": size, "width": size})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config).eval()
    if never_end:
        specials = [vocab[t] for t in ("[PAD]", "[DEC]", "[SEP]", "[UNK]", "[CLS]", "[MASK]")]
        with torch.no_grad():
            model.text_decoder.cls.predictions.bias[specials] = -1e4
    model.save_pretrained(out_dir)
    BlipProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


def save_random_blip2(out_dir: Path, words: list[str], seed: int = 0, queries: int = 4) -> Path:
    """Save a seeded random, tiny BLIP-2 (OPT language model) with a word-level tokenizer."""
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", "<image>", *words])}
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word_level.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>", bos_token="</s>"
    )
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    tower["num_attention_heads"] = 2
    language = OPTConfig(
        vocab_size=len(vocab), hidden_size=32, ffn_dim=64, num_hidden_layers=1,
        num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    config = Blip2Config(
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        qformer_config={**tower, "encoder_hidden_size": 32, "vocab_size": len(vocab)},
        text_config=language.to_dict(),
        num_query_tokens=queries,
        image_token_index=vocab["<image>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir)
    images = BlipImageProcessor(size={"height": 32, "width": 32})
    Blip2Processor(images, tokenizer, num_query_tokens=queries).save_pretrained(out_dir)
    return out_dir


def save_random_open_clip(out_dir: Path, model_cfg: dict[str, Any] | str, seed: int = 0) -> Path:
    """Save a seeded random open_clip model (a config dict, or a built-in architecture name such
    as ViT-L-14) as a local directory that `local-dir:` loads."""
    import open_clip  # the optional caption extra
    from safetensors.torch import save_file

    if isinstance(model_cfg, str):
        model_cfg = open_clip.get_model_config(model_cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    preprocess = {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(f"local-dir:{out_dir}")  # no weights there yet: random
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "open_clip_model.safetensors"))
    return out_dir
