"""Dream (Dream-org/Dream-v0-{Base,Instruct}-7B): Qwen2.5 layout, bidirectional, shifted logits.

Official names: ``model.embed_tokens``, ``model.layers.{i}.{input_layernorm,
post_attention_layernorm, self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}``,
``model.norm``, ``lm_head``. q/k/v carry biases. Raw logit i predicts token i+1.
"""

from __future__ import annotations

import re
from typing import Any

from .config import ModelConfig

MODEL_TYPE = "Dream"
ARCHITECTURE = "DreamModel"

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    **{f"self_attn.{p}_proj.{t}": f"attn.{p}_proj.{t}" for p in "qkv" for t in ("weight", "bias")},
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_TOP = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight"}
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_TOP_INV = {v: k for k, v in _TOP.items()}
_OFF_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_NAT_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def official_to_native(name: str) -> str | None:
    """Map an official tensor name to the DiffusionLM name (None if not a Dream name)."""
    if name in _TOP:
        return _TOP[name]
    m = _OFF_RE.match(name)
    if m and m.group(2) in _LAYER:
        return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


def native_to_official(name: str) -> str:
    """Inverse of :func:`official_to_native`."""
    if name in _TOP_INV:
        return _TOP_INV[name]
    m = _NAT_RE.match(name)
    if m and m.group(2) in _LAYER_INV:
        return f"model.layers.{m.group(1)}.{_LAYER_INV[m.group(2)]}"
    raise KeyError(f"no official Dream name for {name!r}")


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    """ModelConfig from an official Dream config.json dict (Qwen2 field names)."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "mask_token_id"):
        if key not in cfg:
            raise ValueError(f"Dream config.json lacks required key {key!r}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Dream config: hidden_act={cfg['hidden_act']!r} is not supported (expected 'silu')")
    if cfg.get("rope_scaling") not in (None, {}):
        raise ValueError(f"Dream config: rope_scaling={cfg['rope_scaling']!r} is not supported")
    if cfg.get("use_sliding_window", False):
        raise ValueError("Dream config: use_sliding_window=true is not supported")
    d, h = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    known = {
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "max_position_embeddings",
        "tie_word_embeddings", "mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id",
        "model_type", "attention_bias",
    }
    return ModelConfig(
        family="dream",
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=d,
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=h,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or h),
        head_dim=int(cfg.get("head_dim") or d // h),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        attention_bias=bool(cfg.get("attention_bias", True)),  # Qwen2 always has q/k/v bias
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        mask_token_id=int(cfg["mask_token_id"]),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id"),
        shift_logits=True,
        rope_full_precision=False,
        scale_logits=False,
        extra={k: v for k, v in cfg.items() if k not in known},
    )


def official_config(c: ModelConfig) -> dict[str, Any]:
    """Official Dream config.json dict for ``c``, with every field set explicitly."""
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "attention_dropout": 0.0,
        "bos_token_id": c.bos_token_id if c.bos_token_id is not None else c.eos_token_id,
        "eos_token_id": c.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "mask_token_id": c.mask_token_id,
        "max_position_embeddings": c.max_position_embeddings,
        "max_window_layers": c.num_hidden_layers,
        "model_type": MODEL_TYPE,
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads,
        "pad_token_id": c.pad_token_id,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": c.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": c.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": c.vocab_size,
    }
    if c.head_dim * c.num_attention_heads != c.hidden_size:
        out["head_dim"] = c.head_dim
    if not c.attention_bias:
        out["attention_bias"] = False
    for k, v in c.extra.items():
        out.setdefault(k, v)
    return dict(sorted(out.items()))
