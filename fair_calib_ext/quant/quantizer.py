"""Symmetric uniform quantizers: the pure-torch reference of the int4 kernels and fake-quant.

One formula serves every path (reference, fake-quant for calibration, GPTQ):

    scale = (clip * absmax(row)) / qmax        computed in fp32, 1.0 where that is 0
    q     = clamp(round_half_even(x.float() / scale), -qmax - 1, qmax)
    x_hat = q * scale

with qmax = 2^(bits-1) - 1 (7 for int4, range [-8, 7]). ``torch.round`` rounds half to even,
as the C++ kernels do (``std::nearbyint`` in the default rounding mode), so
:func:`quantize_ref` matches ``torch.ops.fair.quantize_int4`` bit for bit (tests/test_quant_*.py).

Weights are quantized per output channel (one scale per row of W [out, in]); activations per
token (one scale per row of X [..., in]), dynamically at run time. Bits >= 16 means "not
quantized" (the W4A16 weight-only setting keeps fp activations).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "QuantConfig",
    "qmax_for",
    "compute_scale",
    "quantize_ref",
    "dequantize",
    "fake_quant",
    "round_ste",
    "check_codes",
    "pack_int4_ref",
    "unpack_int4_ref",
    "search_weight_clip",
]

_PRESETS = {"w4a4": (4, 4), "w4a8": (4, 8), "w8a8": (8, 8), "w4a16": (4, 16)}


@dataclass
class QuantConfig:
    """Bit widths and granularity shared by every method.

    w_bits / a_bits: 4 or 8 (16 = keep full precision). Weights symmetric per output channel,
    activations symmetric per token, dynamic. ``w_clip`` / ``a_clip`` are the fixed clip ratios
    (methods with learnable clipping replace them per layer; FlatQuant's learnable clips are
    configured by ``calib.MethodConfig.learn_clip`` / ``clip_init``).
    """

    w_bits: int = 4
    a_bits: int = 4
    w_clip: float = 1.0
    a_clip: float = 1.0
    symmetric: bool = True
    w_granularity: str = "per_channel"
    a_granularity: str = "per_token"

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits"):
            v = getattr(self, name)
            if v not in (4, 8, 16):
                raise ValueError(f"{name} must be 4, 8 or 16, got {v}")
        if not self.symmetric:
            raise ValueError("only symmetric quantization is implemented (zero point 0)")
        if self.w_granularity != "per_channel" or self.a_granularity != "per_token":
            raise ValueError("granularity: weights per_channel and activations per_token only")
        for name in ("w_clip", "a_clip"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {v}")

    @classmethod
    def preset(cls, name: str, **kw: Any) -> "QuantConfig":
        """'w4a4' | 'w4a8' | 'w8a8' | 'w4a16' (case-insensitive)."""
        key = name.lower()
        if key not in _PRESETS:
            raise ValueError(f"unknown bit setting {name!r}; choose from {sorted(_PRESETS)}")
        w, a = _PRESETS[key]
        return cls(w_bits=w, a_bits=a, **kw)

    @property
    def name(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        # unknown keys are dropped: configs saved before a field was removed (learn_clip,
        # clip_init: never read) still load
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def qmax_for(bits: int) -> int:
    """Largest positive level: 7 for int4, 127 for int8."""
    return 2 ** (bits - 1) - 1


def compute_scale(x: torch.Tensor, bits: int, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Per-row fp32 scale [R] (or [..., 1]-broadcastable when x has more dims), keepdim.

    scale = clip * absmax / qmax, exactly this order of fp32 operations (the kernels' order);
    a zero scale (all-zero row, or clip*absmax/qmax underflowing) becomes 1.0, as in the kernels. ``clip`` may be a float or a tensor broadcastable to
    the row dimension (per-row learnable clip), and may carry gradients.
    """
    absmax = x.float().abs().amax(dim=-1, keepdim=True)
    if isinstance(clip, torch.Tensor):
        clip_t = clip.float()
        if clip_t.dim() == absmax.dim() - 1:
            clip_t = clip_t.unsqueeze(-1)
        scale = clip_t * absmax / qmax_for(bits)
    else:
        scale = (torch.tensor(clip, dtype=torch.float32) * absmax) / qmax_for(bits)
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def quantize_ref(
    x: torch.Tensor, bits: int = 4, clip: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference symmetric per-row quantizer: x [R, K] -> (q int8 [R, K], scale fp32 [R])."""
    scale = compute_scale(x, bits, clip)
    qm = qmax_for(bits)
    q = torch.clamp(torch.round(x.float() / scale), -qm - 1, qm).to(torch.int8)
    return q, scale.squeeze(-1)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [R, K] int, scale [R] -> fp32 [R, K]."""
    return q.float() * scale.float().unsqueeze(-1)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round-half-even forward, identity gradient (straight-through estimator)."""
    return _RoundSTE.apply(x)


def fake_quant(x: torch.Tensor, bits: int, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Quantize-dequantize along the last dim in fp32, differentiable (STE through round).

    Gradients reach ``x`` (through the identity of round and through the scale) and a tensor
    ``clip`` (LSQ/FlatQuant style), so learnable clipping trains. bits >= 16 returns x unchanged.
    The forward value equals ``dequantize(*quantize_ref(x, bits, clip))`` exactly.
    """
    if bits >= 16:
        return x
    xf = x.float()
    scale = compute_scale(xf, bits, clip)
    qm = qmax_for(bits)
    q = torch.clamp(round_ste(xf / scale), -qm - 1, qm)
    return (q * scale).to(x.dtype)


def check_codes(q: torch.Tensor, bits: int, name: str = "q") -> None:
    """Raises ValueError unless the integer tensor ``q`` holds codes of a ``bits``-bit signed
    quantizer ([-8, 7] for 4 bits). Checked on q's own dtype, before any narrowing cast could
    wrap an out-of-range code into range (8 -> -8 in 4 bits, 300 -> 44 in int8)."""
    if q.dtype.is_floating_point or q.dtype == torch.bool or q.dtype.is_complex:
        raise ValueError(f"{name} must be an integer tensor of {bits}-bit codes, got {q.dtype}")
    lo, hi = -qmax_for(bits) - 1, qmax_for(bits)
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"{name} holds values outside [{lo}, {hi}] (min {int(q.min())}, max {int(q.max())}); "
                         f"{bits}-bit codes must lie in [{lo}, {hi}]")


def pack_int4_ref(q: torch.Tensor) -> torch.Tensor:
    """int [R, K] codes in [-8, 7], K even -> uint8 [R, K/2]; low nibble = even column.

    Out-of-range codes raise ValueError (masking them to 4 bits would flip their sign)."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4_ref: K must be even, got {q.shape[-1]}")
    check_codes(q, 4)
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def unpack_int4_ref(p: torch.Tensor) -> torch.Tensor:
    """uint8 [R, K/2] -> int8 [R, K] (sign-extended nibbles)."""
    lo = (p & 0xF).to(torch.int16)
    hi = ((p >> 4) & 0xF).to(torch.int16)
    lo = torch.where(lo > 7, lo - 16, lo)
    hi = torch.where(hi > 7, hi - 16, hi)
    out = torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    return out.to(torch.int8)


@torch.no_grad()
def search_weight_clip(
    w: torch.Tensor, bits: int = 4, grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4
) -> torch.Tensor:
    """QuaRot's per-row clip search: ratio p in {1, 1-1/grid, ..., 1-max_shrink} minimising
    sum |Q_p(w) - w|^norm. Returns fp32 [R] ratios."""
    wf = w.float()
    best = torch.full((wf.shape[0],), float("inf"))
    best_p = torch.ones(wf.shape[0])
    for i in range(int(max_shrink * grid) + 1):
        p = 1.0 - i / grid
        err = (fake_quant(wf, bits, p) - wf).abs().pow(norm).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        best_p = torch.where(better, torch.full_like(best_p, p), best_p)
    return best_p
