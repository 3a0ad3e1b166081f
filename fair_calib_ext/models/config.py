"""Family-neutral configuration of a masked-diffusion decoder (LLaDA or Dream)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..validate import check_float, check_int

FAMILIES = ("llada", "dream")


# Inclusive limits per size field: far above LLaDA-8B / Dream-7B (126464 / 152064 vocab, 4096 / 3584
# wide, 32 / 28 layers, 4096 / 131072 positions), far below what would hang building the model.
_INT_LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 22), "hidden_size": (2, 1 << 16), "intermediate_size": (1, 1 << 18),
    "num_hidden_layers": (1, 1024), "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024),
    "head_dim": (2, 4096), "max_position_embeddings": (1, 1 << 22), "mask_token_id": (0, (1 << 22) - 1),
}


@dataclass
class ModelConfig:
    """Architecture of one DiffusionLM, parsed from an official config.json.

    ``vocab_size`` is the number of embedding rows (= logits width), which for both
    official checkpoints is larger than the tokenizer's vocabulary.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    attention_bias: bool  # bias on q/k/v only (Dream); LLaDA-8B has none
    tie_word_embeddings: bool
    mask_token_id: int
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    shift_logits: bool = False  # Dream: raw logit i predicts token i+1
    # LLaDA rotates q/k in fp32 ("rope_full_precision"); Dream casts cos/sin to the
    # activation dtype instead. Identical in fp32, different in bf16.
    rope_full_precision: bool = True
    scale_logits: bool = False  # LLaDA option: logits * 1/sqrt(d_model)
    # official config keys we do not interpret, kept so a save round-trips them
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        # types and ranges first: a huge or negative size would hang or fail deep inside the build
        for name, (lo, hi) in _INT_LIMITS.items():
            check_int(getattr(self, name), name, lo=lo, hi=hi)
        check_float(self.rope_theta, "rope_theta", lo=0.0, lo_open=True)
        check_float(self.rms_norm_eps, "rms_norm_eps", lo=0.0, hi=1.0, lo_open=True)
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"mask_token_id {self.mask_token_id} outside the vocabulary [0, {self.vocab_size})"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise (so typos are caught)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {unknown}")
        return cls(**d)
