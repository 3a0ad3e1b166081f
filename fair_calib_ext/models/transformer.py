"""The shared bidirectional decoder behind LLaDA and Dream.

Both families are pre-norm transformers with RoPE, RMSNorm and SwiGLU; they differ only in
details carried by :class:`ModelConfig` (q/k/v bias, GQA, RoPE precision, logit shift,
position ids under padding, how padded query rows are treated). Module names follow
``/work/interfaces.md`` so calibration code can address linears without family code.

Shapes: B batch, S sequence, D hidden, H heads, Hk key/value heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

__all__ = [
    "RMSNorm",
    "Attention",
    "MLP",
    "DecoderLayer",
    "DiffusionLM",
    "DiffusionLMOutput",
    "KVCache",
    "LayerKV",
    "rope_cos_sin",
    "apply_rope",
    "LAYER_MAP",
]

# linears grouped by the input they share, relative to a DecoderLayer
LAYER_MAP: dict[str, Any] = {
    "qkv": ["attn.q_proj", "attn.k_proj", "attn.v_proj"],
    "o": ["attn.o_proj"],
    "up_gate": ["mlp.up_proj", "mlp.gate_proj"],
    "down": ["mlp.down_proj"],
    "norms": {"qkv": "attn_norm", "up_gate": "mlp_norm"},
}


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) computed in fp32, cast back, then times the weight.

    The cast happens before the weight multiply in both official implementations.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, 1, S, Dh] (half-split layout: both halves share frequencies).

    Frequencies and angles are computed in fp32 (as both official models do) and then
    cast to ``dtype`` (fp32 for LLaDA's full-precision RoPE, the activation dtype for Dream).
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim)
    )
    freqs = position_ids.float()[..., None] * inv_freq  # [B, S, Dh/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, Dh]
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, S, Dh] in the precision of cos/sin; returns x's dtype."""
    xc = x.to(cos.dtype)
    return (xc * cos + _rotate_half(xc) * sin).to(x.dtype)


class LayerKV:
    """One layer's cached keys and values [B, Hk, L, Dh] (after RoPE, before GQA repetition).

    Fast-dLLM's approximate cache. An empty one is filled by a forward over the whole sequence.
    A forward over a window at positions [start, start + W) then attends over the cached entries
    with the window's own fresh keys/values in place of the cached ones for those positions:

    - prefix cache (the cache holds positions [0, start) and the window runs to the end of the
      sequence): the keys are the cached ones followed by the window's;
    - dual cache (the cache covers the window): the window's entries are replaced in place, so
      the cache keeps the newest block and the stale prefix and suffix.
    """

    def __init__(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> None:
        self.k, self.v = k, v

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store or combine the window's k/v [B, Hk, W, Dh]; returns the keys/values to attend over."""
        if self.k is None or self.v is None:  # building: keep what this (full) forward computed
            if start != 0:
                raise ValueError(f"an empty KV cache is built by a forward from position 0, not {start}")
            self.k, self.v = k, v
            return k, v
        cached, end = self.k.shape[2], start + k.shape[2]
        if end <= cached:  # dual: the window's positions are recomputed, the rest stays stale
            self.k[:, :, start:end] = k
            self.v[:, :, start:end] = v
            return self.k, self.v
        if cached == start:  # prefix: cached positions [0, start), then the window to the end
            return torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        raise ValueError(f"a window at positions [{start}, {end}) fits neither a prefix cache nor a "
                         f"cache over {cached} positions")


class KVCache:
    """Per-layer :class:`LayerKV` of a DiffusionLM; see ``DiffusionLM.forward(kv_cache=...)``."""

    def __init__(self, layers: list[LayerKV]) -> None:
        self.layers = layers

    @classmethod
    def empty(cls, num_layers: int) -> KVCache:
        """A cache to be filled by the next full forward."""
        return cls([LayerKV() for _ in range(num_layers)])

    @property
    def length(self) -> int:
        """Number of cached positions (0 when empty)."""
        k = self.layers[0].k if self.layers else None
        return 0 if k is None else int(k.shape[2])

    def prefix(self, n: int) -> KVCache:
        """The entries of positions [0, n) only (Fast-dLLM's prefix cache); views, not copies."""
        if any(lk.k is None or lk.v is None for lk in self.layers):
            raise ValueError("prefix() of an empty KV cache")
        return KVCache([LayerKV(lk.k[:, :, :n], lk.v[:, :, :n]) for lk in self.layers])  # type: ignore[index]


class Attention(nn.Module):
    """Bidirectional multi-head / grouped-query attention through SDPA."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, h, hk, dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, hk, dh
        self.q_proj = nn.Linear(d, h * dh, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, hk * dh, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, hk * dh, bias=config.attention_bias)
        self.o_proj = nn.Linear(h * dh, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        kv: LayerKV | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D]. With ``kv``, x holds positions [start, start + S) and the
        keys/values come from the cache (see :class:`LayerKV`)."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k, v = kv.update(k, v, start)
        if self.num_kv_heads != self.num_heads:  # GQA: each kv head serves consecutive q heads
            rep = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=False)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: h += attn(attn_norm(h)); h += mlp(mlp_norm(h))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        h: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        kv: LayerKV | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """h [B, S, D] -> [B, S, D]; attention_mask is SDPA-ready (from prepare_inputs); ``kv`` /
        ``start``: the layer's KV cache and the window's first position (see :class:`LayerKV`)."""
        h = h + self.attn(self.attn_norm(h), position_embeddings, attention_mask, kv, start)
        return h + self.mlp(self.mlp_norm(h))


@dataclass
class DiffusionLMOutput:
    """Model output; ``logits`` [B, S, V] are the official raw logits (model dtype)."""

    logits: torch.Tensor

    def __getitem__(self, i: int) -> torch.Tensor:  # tuple-style access, as HF outputs allow
        return (self.logits,)[i]


class DiffusionLM(nn.Module):
    """Native LLaDA / Dream masked-diffusion LM (plain nn.Linear everywhere)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # -- properties used by samplers and tools -------------------------------------------
    @property
    def family(self) -> str:
        return self.config.family

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def layer_map(self) -> dict[str, Any]:
        """Which linears share an input, names relative to a DecoderLayer (same for both families)."""
        return {k: (dict(v) if isinstance(v, dict) else list(v)) for k, v in LAYER_MAP.items()}

    # -- forward ----------------------------------------------------------------------------
    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        rope_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Embed ``input_ids`` [B, S] and build what every DecoderLayer needs.

        ``attention_mask`` [B, S] (1 = real token). LLaDA: positions are always arange(S) and
        padded keys get an additive dtype-min bias (padded query rows still see real keys).
        Dream: positions are cumsum(mask) - 1 under padding and the mask is key AND query,
        so padded query rows come out as zeros (as torch's SDPA does for fully masked rows).
        ``rope_dtype`` overrides the RoPE tables' dtype (calibration runs blocks in fp32 whatever
        dtype the embeddings are held in).
        Returns (h0 [B, S, D], {"position_embeddings": (cos, sin), "attention_mask": m}).
        """
        cfg = self.config
        b, s = input_ids.shape
        h = self.embed_tokens(input_ids)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device=input_ids.device).bool()
            if bool(attention_mask.all()):
                attention_mask = None  # the official code runs unmasked when nothing is padded
        if position_ids is None:
            if cfg.family == "dream" and attention_mask is not None:
                position_ids = attention_mask.long().cumsum(-1) - 1
                position_ids = position_ids.masked_fill(~attention_mask, 1)
            else:
                position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        if rope_dtype is None:
            rope_dtype = torch.float32 if cfg.rope_full_precision else h.dtype
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, rope_dtype)
        sdpa_mask: torch.Tensor | None = None
        if attention_mask is not None:
            if cfg.family == "dream":
                sdpa_mask = attention_mask[:, None, :, None] & attention_mask[:, None, None, :]
            else:
                sdpa_mask = torch.zeros(b, 1, 1, s, dtype=h.dtype, device=h.device)
                sdpa_mask.masked_fill_(~attention_mask[:, None, None, :], torch.finfo(h.dtype).min)
        return h, {"position_embeddings": (cos, sin), "attention_mask": sdpa_mask}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        start: int = 0,
        **_: Any,
    ) -> DiffusionLMOutput:
        """input_ids [B, S] -> output with raw logits [B, S, V] (Dream: unshifted).

        ``kv_cache`` (Fast-dLLM's approximate cache, no padding): an empty :class:`KVCache`
        is filled by a forward over the whole sequence; a filled one makes ``input_ids`` the
        window at positions [start, start + S) (the positions its RoPE uses), attending over
        the cached keys/values as :class:`LayerKV` describes. Logits cover the window only.
        """
        if kv_cache is not None:
            if attention_mask is not None and not bool(attention_mask.bool().all()):
                raise ValueError("kv_cache does not support padding (attention_mask with zeros)")
            if len(kv_cache.layers) != len(self.layers):
                raise ValueError(f"kv_cache has {len(kv_cache.layers)} layers, the model {len(self.layers)}")
            attention_mask = None
            if position_ids is None:
                b, s = input_ids.shape
                position_ids = torch.arange(start, start + s, device=input_ids.device).expand(b, s)
        h, kw = self.prepare_inputs(input_ids, attention_mask, position_ids)
        for i, layer in enumerate(self.layers):
            if kv_cache is None:
                h = layer(h, **kw)
            else:
                h = layer(h, **kw, kv=kv_cache.layers[i], start=start)
        logits = self.lm_head(self.norm(h))
        if self.config.scale_logits:
            logits = logits * (1.0 / self.config.hidden_size**0.5)
        return DiffusionLMOutput(logits=logits)

    def denoise_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, S, V] where column i predicts token i (Dream shifted right, col 0 repeated)."""
        logits = self.forward(input_ids, attention_mask, position_ids).logits
        return align_logits(logits, self.config.shift_logits)


def align_logits(logits: torch.Tensor, shift: bool) -> torch.Tensor:
    """Dream's alignment: cat(logits[:, :1], logits[:, :-1]); identity when ``shift`` is False."""
    if not shift:
        return logits
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
