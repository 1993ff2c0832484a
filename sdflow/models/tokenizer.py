"""An offline CLIP-style BPE tokenizer, trained on the dataset's captions for from-scratch runs.

Saved so that `CLIPTokenizer.from_pretrained` loads it; ids 0 and 1 are its start and end tokens.
Its vocabulary always holds the 256 byte symbols and their word-final forms (as CLIP's does), so a
word or character absent from the training captions is spelled in bytes, never read as a special
token; the rest of the vocabulary is merges learned from the captions.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

from tokenizers import Regex, normalizers, pre_tokenizers
from transformers import CLIPTokenizer

from sdflow.config import ModelConfig
from sdflow.errors import UserError
from sdflow.store.stageio import atomic_dir

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORD_END = "</w>"
# CLIP's pre-tokenizer: special tokens, contractions, letter runs, single digits, punctuation runs.
CLIP_SPLIT = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)


def _word_splitter() -> tuple[normalizers.Normalizer, pre_tokenizers.PreTokenizer]:
    """The exact normaliser and pre-tokeniser CLIPTokenizer applies, so trained merges match it."""
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    split = pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True)
    pre = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return normalizer, pre


def count_words(captions: Iterable[str]) -> Counter[tuple[str, ...]]:
    """Byte-level words of all captions as symbol tuples, the last one carrying `</w>`."""
    normalizer, pre = _word_splitter()
    counts: Counter[str] = Counter()
    for caption in captions:
        text = normalizer.normalize_str(caption or "")
        counts.update(word for word, _ in pre.pre_tokenize_str(text))
    return Counter({(*w[:-1], w[-1] + WORD_END): n for w, n in counts.items() if w})


def learn_merges(words: Counter[tuple[str, ...]], merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges, most frequent pair first, ties broken by the pair's text.

    Written out (not `tokenizers.trainers.BpeTrainer`) because that trainer breaks ties by hash-map
    order, so the same captions gave different vocabularies in different processes.
    """
    items = [list(w) for w in words]
    freq = [words[w] for w in words]
    counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, symbols in enumerate(items):
        for pair in pairwise(symbols):
            counts[pair] += freq[i]
            where[pair].add(i)
    heap = [(-n, pair) for pair, n in counts.items()]
    heapq.heapify(heap)
    learned: list[tuple[str, str]] = []
    while heap and len(learned) < merges:
        n, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -n or n == 0:
            continue  # a stale heap entry: the pair's count changed after it was pushed
        learned.append(pair)
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair)):
            _merge_word(items, freq, i, pair, counts, where, touched)
        counts.pop(pair, None)
        for other in sorted(touched):
            if counts.get(other, 0) > 0:
                heapq.heappush(heap, (-counts[other], other))
    return learned


def _merge_word(items, freq, i, pair, counts, where, touched) -> None:
    """Apply one merge to word `i`, updating the pair counts and the pair -> words index."""
    old = items[i]
    for p in pairwise(old):
        counts[p] -= freq[i]
        touched.add(p)
    new, j = [], 0
    while j < len(old):
        if j + 1 < len(old) and (old[j], old[j + 1]) == pair:
            new.append(old[j] + old[j + 1])
            j += 2
        else:
            new.append(old[j])
            j += 1
    items[i] = new
    for p in pairwise(new):
        counts[p] += freq[i]
        where[p].add(i)
        touched.add(p)


def byte_alphabet() -> list[str]:
    """All 256 byte symbols and their word-final forms: any text is spelled with these alone."""
    full = pre_tokenizers.ByteLevel.alphabet()
    return sorted(set(full) | {s + WORD_END for s in full})


def train_tokenizer(captions: Iterable[str], model: ModelConfig, out_dir: Path) -> CLIPTokenizer:
    """Train a CLIP-style BPE tokenizer on the captions and save it (loads with CLIPTokenizer)."""
    words = count_words(captions)
    if not words:
        raise UserError("Cannot train a tokenizer: the training captions contain no words.")
    alphabet = byte_alphabet()  # every byte, so no text ever falls back to a special token
    room = model.tokenizer_vocab_size - 2 - len(alphabet)
    if room < 0:  # the config's bound says the same; this guards a change of either
        raise UserError(
            f"model.tokenizer_vocab_size is {model.tokenizer_vocab_size}, but the byte alphabet "
            f"and the special tokens alone take {2 + len(alphabet)}: use at least that."
        )
    merges = learn_merges(words, room)
    tokens = [BOS, EOS, *alphabet, *(a + b for a, b in merges)]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model.max_token_length)
    save_tokenizer(tokenizer, vocab, merges, Path(out_dir))
    return CLIPTokenizer.from_pretrained(out_dir)


def save_tokenizer(tokenizer: CLIPTokenizer, vocab: dict, merges: list, out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json, and the vocab.json + merges.txt CLIP loaders read."""
    with atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1))
        lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
        (tmp / "merges.txt").write_text("\n".join(lines) + "\n")
