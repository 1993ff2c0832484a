"""The BPE tokenizer trained on captions (`sdflow.models.tokenizer`): round trips, loading from its
files alone, determinism across processes, byte fallback, refused settings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError
from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer

from sdflow.config import ModelConfig
from sdflow.errors import UserError
from sdflow.models.tokenizer import train_tokenizer
from sdflow.profiles import load_profile

CAPTIONS = [
    "a red square on a blue background",
    "a green circle on a white background",
    "two yellow triangles and a red circle",
    "a small blue square",
    "A BIG Green Triangle",
] * 4


@pytest.fixture(scope="module")
def config():
    return load_profile("tiny-test")


# ---------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_captions(config, tmp_path):
    train_tokenizer(CAPTIONS, config.model, tmp_path / "tok")
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "tok").iterdir()
    }
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert tokenizer.model_max_length == config.model.max_token_length
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|startoftext|>", "<|endoftext|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 1)
    assert len(tokenizer) <= config.model.tokenizer_vocab_size
    for caption in set(CAPTIONS):
        ids = tokenizer(caption).input_ids
        assert ids[0] == 0 and ids[-1] == 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption.lower()
    # merges were learned: frequent words are single tokens, not letters
    assert len(tokenizer("background").input_ids) == 3
    padded = tokenizer(["a red square " * 20], padding="max_length", truncation=True).input_ids
    assert len(padded[0]) == config.model.max_token_length


def test_tokenizer_loads_from_vocab_and_merges_alone(config, tmp_path):
    tokenizer = train_tokenizer(CAPTIONS, config.model, tmp_path / "tok")
    os.remove(tmp_path / "tok" / "tokenizer.json")
    reloaded = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    for caption in set(CAPTIONS):
        assert reloaded(caption).input_ids == tokenizer(caption).input_ids


def test_tokenizer_is_deterministic_across_processes(config, tmp_path):
    """Same captions, another process with another hash seed: byte-identical files."""
    train_tokenizer(CAPTIONS, config.model, tmp_path / "here")
    script = (
        "import sys; from pathlib import Path; from sdflow.models.tokenizer import train_tokenizer; "
        "from sdflow.profiles import load_profile; "
        f"train_tokenizer({CAPTIONS!r}, load_profile('tiny-test').model, Path(sys.argv[1]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "there")], check=True, env=env)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "there" / name).read_bytes()


@pytest.mark.parametrize("text", ["a purple circle", "ünïcödé ✓ 🙂", "a zebra near the café"])
def test_tokenizer_spells_unseen_words_and_characters_in_bytes(config, tmp_path, text):
    """Nothing the captions never showed may become a special token (it used to be end-of-text)."""
    train_tokenizer(CAPTIONS, config.model, tmp_path / "tok")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    ids = tokenizer(text, truncation=False).input_ids
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert not special & set(ids[1:-1]), tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text.lower()
    # every one of the 256 bytes has a token of its own and a word-final one
    vocab = tokenizer.get_vocab()
    byte_symbols = pre_tokenizers.ByteLevel.alphabet()
    assert all(s in vocab and s + "</w>" in vocab for s in byte_symbols)


def test_tokenizer_training_twice_gives_identical_files(config, tmp_path):
    for name in ("one", "two"):
        train_tokenizer(CAPTIONS, config.model, tmp_path / name)
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_tokenizer_vocab_size_must_leave_room_for_merges(config):
    assert ModelConfig().tokenizer_vocab_size > 2 + 2 * 256  # the default learns merges
    with pytest.raises(ValidationError, match="tokenizer_vocab_size"):
        ModelConfig(tokenizer_vocab_size=2 + 2 * 256)
    for name in ("tiny-test", "tiny-cpu", "scratch-small"):
        assert load_profile(name).model.tokenizer_vocab_size > 2 + 2 * 256


def test_tokenizer_rejects_captions_without_words(config, tmp_path):
    with pytest.raises(UserError, match="no words"):
        train_tokenizer(["", "   "], config.model, tmp_path / "tok")
