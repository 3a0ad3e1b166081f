"""Native LLaDA and Dream models: config parsing, the shared decoder, loading and saving.

Importing this package also registers the two model types with transformers' Auto classes
(when transformers is installed), so ``AutoModel.from_pretrained(dir)`` works offline without
``trust_remote_code``; see :mod:`fair_calib_ext.models.hf`.
"""

from __future__ import annotations

from .config import ModelConfig
from .loading import (
    ASSETS_DIR,
    CheckpointError,
    available_embedded,
    build_model,
    load_generation_config,
    load_pretrained,
    load_tokenizer,
    official_config,
    parse_official_config,
    read_config,
    resolve_model_path,
    save_pretrained,
)
from .transformer import (
    LAYER_MAP,
    DecoderLayer,
    DiffusionLM,
    DiffusionLMOutput,
    KVCache,
    LayerKV,
    RMSNorm,
    align_logits,
)

from . import hf as _hf  # noqa: E402

_hf.install()

__all__ = [
    "ASSETS_DIR",
    "CheckpointError",
    "DecoderLayer",
    "DiffusionLM",
    "DiffusionLMOutput",
    "KVCache",
    "LayerKV",
    "LAYER_MAP",
    "ModelConfig",
    "RMSNorm",
    "align_logits",
    "available_embedded",
    "build_model",
    "load_generation_config",
    "load_pretrained",
    "load_tokenizer",
    "official_config",
    "parse_official_config",
    "read_config",
    "resolve_model_path",
    "save_pretrained",
]
