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


def build_vocab(extra_words: list[str] | None = None) -> list[str]:
    """Token strings in id order: specials, digits, punctuation, words, each bare and with ▁."""
    toks = list(SPECIALS) + [SPACE]
    pieces = [str(d) for d in range(10)] + PUNCT + vocabulary_words() + list(extra_words or [])
    for p in dict.fromkeys(pieces):
        toks += [p, SPACE + p]
    return list(dict.fromkeys(toks))


def build_tokenizer(extra_words: list[str] | None = None) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` described in the module docstring."""
    vocab = {t: i for i, t in enumerate(build_vocab(extra_words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.Fuse()])
    tok.add_special_tokens(SPECIALS)
    return tok


def save_tokenizer(out_dir: str | os.PathLike, model_max_length: int = 512) -> Tokenizer:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
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
