"""Tiny random models for tests (no download): configs that exercise every architecture detail."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .loading import build_model, save_pretrained
from .transformer import DiffusionLM

__all__ = ["tiny_config", "tiny_model", "tiny_checkpoint"]


def tiny_config(family: str = "llada", **overrides: Any) -> ModelConfig:
    """A few-thousand-parameter config: LLaDA is MHA without biases and full-precision RoPE;
    Dream is GQA (2 KV heads for 4 query heads) with q/k/v bias and shifted logits."""
    if family not in ("llada", "dream"):
        raise ValueError(f"family must be 'llada' or 'dream', got {family!r}")
    dream = family == "dream"
    kw: dict[str, Any] = dict(
        family=family,
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2 if dream else 4,
        head_dim=8,
        rope_theta=1e6 if dream else 5e5,
        rms_norm_eps=1e-6 if dream else 1e-5,
        max_position_embeddings=256,
        attention_bias=dream,
        tie_word_embeddings=False,
        mask_token_id=95,
        eos_token_id=2,
        pad_token_id=2,
        bos_token_id=1,
        shift_logits=dream,
        rope_full_precision=not dream,
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def tiny_model(family: str = "llada", *, seed: int = 0, init_std: float = 0.5,
               dtype: torch.dtype = torch.float32, **overrides: Any) -> DiffusionLM:
    """A random tiny DiffusionLM. The large ``init_std`` gives peaked, tie-free distributions,
    which makes token-level sampler comparisons meaningful."""
    return build_model(tiny_config(family, **overrides), seed=seed, init_std=init_std, dtype=dtype)


def tiny_checkpoint(path: str | os.PathLike[str], family: str = "llada", *, seed: int = 0,
                    init_std: float = 0.5, max_shard_bytes: int | None = None, **overrides: Any) -> Path:
    """Write a tiny random checkpoint in the official layout to ``path``; returns the path."""
    model = tiny_model(family, seed=seed, init_std=init_std, **overrides)
    return save_pretrained(model, path, max_shard_bytes=max_shard_bytes)
