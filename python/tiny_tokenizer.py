"""Word-level tokenizer of the embedded tiny models, built with the ``tokenizers`` library.

Scheme (documented in the model cards):
- a normalizer turns every space into the marker ``▁`` (U+2581), so that whitespace is carried by
  the token that follows it and ``decode(encode(text)) == text`` for every task string;
- a regex pre-tokenizer splits into: one digit (optionally preceded by ``▁``), one word of letters
  (optionally preceded by ``▁``), one punctuation character (optionally preceded by ``▁``), or a
  bare ``▁``;
- a WordLevel model maps each piece to an id (``<|unk|>`` for pieces outside the vocabulary);
- the decoder replaces ``▁`` by a space and concatenates (no extra spaces between tokens).
So every word is one token, every digit is one token (``4`` and ``▁4`` are two ids: the digit
with and without a preceding space), and ``" 1419"`` encodes as ``▁1 4 1 9``.
Special tokens: ``<|pad|>`` 0, ``<|eos|>`` 1, ``<|mask|>`` 2, ``<|bos|>`` 3, ``<|unk|>`` 4.

Version 2 (``version=2``, for the second generation of the tiny models; version 1 above stays the
default and is what the shipped models use): digits are always split from their space, so every
digit has exactly ONE id (``0``-``9``, no ``▁d`` tokens) and a space before a digit is the
standalone ``▁`` token: ``" 1419"`` encodes as ``▁ 1 4 1 9`` and ``"sort 7 3"`` as
``▁sort ▁ 7 ▁ 3``. Words and punctuation keep their bare and ``▁``-prefixed ids. Answers get
longer in tokens (8 sorted digits: 16 tokens), so v2 models need ``gen_length`` >= 17
(``GEN_LENGTH_V2``); the task suite's prompt/answer texts are unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from fair_calib_ext.eval.tasks import vocabulary_words

SPECIALS = ["<|pad|>", "<|eos|>", "<|mask|>", "<|bos|>", "<|unk|>"]
PAD_ID, EOS_ID, MASK_ID, BOS_ID, UNK_ID = range(5)
PUNCT = list(":?.,+-*=!'")
SPACE = "\u2581"
PIECE = r"\u2581?[0-9]|\u2581?[A-Za-z]+|\u2581?[^A-Za-z0-9\u2581]|\u2581"
# v2: a digit never carries its space (one id per digit); "▁" before a digit is its own piece
PIECE_V2 = r"[0-9]|\u2581?[A-Za-z]+|\u2581?[^A-Za-z0-9\u2581]|\u2581"
VERSIONS = (1, 2)
# longest v2 answer: 8 sorted digits = 16 tokens, + EOS = 17; 20 leaves a little room
GEN_LENGTH_V2 = 20


def _check_version(version: int) -> None:
    if version not in VERSIONS:
        raise ValueError(f"tokenizer version must be one of {VERSIONS}, got {version!r}")


def build_vocab(extra_words: list[str] | None = None, version: int = 1) -> list[str]:
    """Token strings in id order: specials, ▁, digits, punctuation, words, each bare and with ▁
    (version 2: digits bare only, one id per digit)."""
    _check_version(version)
    toks = list(SPECIALS) + [SPACE]
    digits = [str(d) for d in range(10)]
    if version == 2:
        toks += digits
        pieces = PUNCT + vocabulary_words() + list(extra_words or [])
    else:
        pieces = digits + PUNCT + vocabulary_words() + list(extra_words or [])
    for p in dict.fromkeys(pieces):
        toks += [p, SPACE + p]
    return list(dict.fromkeys(toks))


def build_tokenizer(extra_words: list[str] | None = None, version: int = 1) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` described in the module docstring (``version`` 1 or 2)."""
    vocab = {t: i for i, t in enumerate(build_vocab(extra_words, version))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    piece = PIECE_V2 if version == 2 else PIECE
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(piece), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.Fuse()])
    tok.add_special_tokens(SPECIALS)
    return tok


def word_tokens(tok: Tokenizer) -> list[str]:
    """Every single-token word a ``reverse`` prompt can hold: the words (letters) whose
    ``▁word`` form is one vocabulary token, in id order (used for reverse training, v2)."""
    vocab = tok.get_vocab()
    return [t[1:] for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])
            if t.startswith(SPACE) and len(t) > 1 and t[1:].isascii() and t[1:].isalpha()]


def save_tokenizer(out_dir: str | os.PathLike, model_max_length: int = 512, version: int = 1) -> Tokenizer:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(version=version)
    tok.save(str(out / "tokenizer.json"))
    specials = {
        "pad_token": "<|pad|>", "eos_token": "<|eos|>", "mask_token": "<|mask|>",
        "bos_token": "<|bos|>", "unk_token": "<|unk|>",
    }
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return tok
