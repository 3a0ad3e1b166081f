"""LLaDA (GSAI-ML/LLaDA-8B-*, LLaDA-1.5): official config.json fields and tensor names.

Official layout (prefix ``model.transformer.``): ``wte``, ``blocks.{i}.{attn_norm, ff_norm,
q_proj, k_proj, v_proj, attn_out, ff_proj (gate), up_proj, ff_out (down)}``, ``ln_f`` and the
untied head ``ff_out``. Only the ``llama`` block with RoPE, RMSNorm and SiLU-GLU is supported —
that is what every released LLaDA checkpoint uses.
"""

from __future__ import annotations

import re
from typing import Any

from .config import ModelConfig

MODEL_TYPE = "llada"
ARCHITECTURE = "LLaDAModelLM"
DEFAULT_MASK_ID = 126336  # <|mdm_mask|>; only a fallback when config.json has no mask_token_id

_P = "model.transformer."
_BLOCK = {
    "attn_norm.weight": "attn_norm.weight",
    "ff_norm.weight": "mlp_norm.weight",
    "q_proj.weight": "attn.q_proj.weight",
    "k_proj.weight": "attn.k_proj.weight",
    "v_proj.weight": "attn.v_proj.weight",
    "q_proj.bias": "attn.q_proj.bias",
    "k_proj.bias": "attn.k_proj.bias",
    "v_proj.bias": "attn.v_proj.bias",
    "attn_out.weight": "attn.o_proj.weight",
    "ff_proj.weight": "mlp.gate_proj.weight",
    "up_proj.weight": "mlp.up_proj.weight",
    "ff_out.weight": "mlp.down_proj.weight",
}
_TOP = {"wte.weight": "embed_tokens.weight", "ln_f.weight": "norm.weight", "ff_out.weight": "lm_head.weight"}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}
_TOP_INV = {v: k for k, v in _TOP.items()}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def official_to_native(name: str) -> str | None:
    """Map an official tensor name to the DiffusionLM name (None if not a LLaDA name)."""
    if not name.startswith(_P):
        return None
    rest = name[len(_P):]
    if rest in _TOP:
        return _TOP[rest]
    m = _BLOCK_RE.match(rest)
    if m and m.group(2) in _BLOCK:
        return f"layers.{m.group(1)}.{_BLOCK[m.group(2)]}"
    return None


def native_to_official(name: str) -> str:
    """Inverse of :func:`official_to_native`."""
    if name in _TOP_INV:
        return _P + _TOP_INV[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _BLOCK_INV:
        return f"{_P}blocks.{m.group(1)}.{_BLOCK_INV[m.group(2)]}"
    raise KeyError(f"no official LLaDA name for {name!r}")


def _unsupported(cfg: dict[str, Any], key: str, ok: Any, default: Any) -> None:
    val = cfg.get(key, default)
    allowed = ok if isinstance(ok, tuple) else (ok,)
    if val not in allowed:
        raise ValueError(f"LLaDA config: {key}={val!r} is not supported (expected {allowed})")


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    """ModelConfig from an official LLaDA config.json dict.

    Official class defaults are GPT-2-like, so fields that decide the architecture are
    required here rather than silently defaulted.
    """
    for key in ("d_model", "n_heads", "n_layers", "vocab_size"):
        if key not in cfg:
            raise ValueError(f"LLaDA config.json lacks required key {key!r}")
    _unsupported(cfg, "block_type", "llama", "sequential")
    _unsupported(cfg, "rope", True, False)
    _unsupported(cfg, "alibi", False, False)
    _unsupported(cfg, "layer_norm_type", "rms", "default")
    _unsupported(cfg, "activation_type", "silu", "swiglu")
    _unsupported(cfg, "include_bias", False, False)
    _unsupported(cfg, "input_emb_norm", False, False)
    _unsupported(cfg, "attention_layer_norm", False, False)
    _unsupported(cfg, "block_group_size", 1, 1)
    d, h = int(cfg["d_model"]), int(cfg["n_heads"])
    hk = cfg.get("n_kv_heads")
    if hk is None:
        hk = 1 if cfg.get("multi_query_attention") else h
    ffn = cfg.get("mlp_hidden_size") or int(cfg.get("mlp_ratio", 4)) * d
    emb = cfg.get("embedding_size") or cfg["vocab_size"]
    known = {
        "d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "mlp_ratio", "vocab_size",
        "embedding_size", "rope_theta", "rms_norm_eps", "max_sequence_length", "include_qkv_bias",
        "weight_tying", "mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id",
        "rope_full_precision", "scale_logits", "model_type",
    }
    return ModelConfig(
        family="llada",
        vocab_size=int(emb),
        hidden_size=d,
        intermediate_size=int(ffn),
        num_hidden_layers=int(cfg["n_layers"]),
        num_attention_heads=h,
        num_key_value_heads=int(hk),
        head_dim=d // h,
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=int(cfg.get("max_sequence_length", 1024)),
        attention_bias=bool(cfg.get("include_qkv_bias") or False),
        tie_word_embeddings=bool(cfg.get("weight_tying", True)),
        mask_token_id=int(cfg["mask_token_id"]) if cfg.get("mask_token_id") is not None else DEFAULT_MASK_ID,
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id"),
        shift_logits=False,
        rope_full_precision=bool(cfg.get("rope_full_precision", True)),
        scale_logits=bool(cfg.get("scale_logits", False)),
        extra={k: v for k, v in cfg.items() if k not in known},
    )


def official_config(c: ModelConfig) -> dict[str, Any]:
    """Official LLaDA config.json dict for ``c``, with every field set explicitly."""
    if c.num_attention_heads * c.head_dim != c.hidden_size:
        raise ValueError("LLaDA requires head_dim * n_heads == d_model")
    out: dict[str, Any] = {
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": [ARCHITECTURE],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "embedding_dropout": 0.0,
        "embedding_size": c.vocab_size,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": c.attention_bias,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "multi_query_attention": None,
        "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads,
        "n_layers": c.num_hidden_layers,
        "d_model": c.hidden_size,
        "mlp_hidden_size": c.intermediate_size,
        "mlp_ratio": 4,
        "max_sequence_length": c.max_position_embeddings,
        "model_type": MODEL_TYPE,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": c.rms_norm_eps,
        "rope": True,
        "rope_full_precision": c.rope_full_precision,
        "rope_theta": c.rope_theta,
        "scale_logits": c.scale_logits,
        "use_cache": False,
        "vocab_size": c.vocab_size,
        "weight_tying": c.tie_word_embeddings,
        "mask_token_id": c.mask_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
    }
    if c.bos_token_id is not None:
        out["bos_token_id"] = c.bos_token_id
    for k, v in c.extra.items():
        out.setdefault(k, v)
    return dict(sorted(out.items()))
