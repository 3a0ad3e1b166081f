"""Typed wrappers over the ``torch.ops.fair`` library, its fake kernels and autograd.

The schemas and the CPU/CUDA kernels are C++ (``csrc/``); importing :mod:`fair_calib_ext._C`
registers them. This module adds what the dispatcher needs from Python:

* a fake (meta) implementation per op, so the ops trace under ``torch.compile`` / FakeTensor;
* autograd for :func:`weighted_mse` and :func:`w4a4_linear` (straight-through for ``x``);
* helpers to select the CPU kernel path (``scalar``, ``avx2``, ``avx512_vnni``, ``amx``).

Int4 data contract (``docs/kernels.md``): an int4 matrix ``[R, K]`` is stored as
``uint8 [R, K/2]``, the even column in the low nibble, two's-complement nibbles.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ._ext import ERROR as _C_ERROR
from ._ext import _C  # registers torch.ops.fair

if _C is None:  # without the kernels there is nothing to wrap: say why, not "operator does not exist"
    raise ImportError(f"fair_calib_ext._C is not built or failed to load ({_C_ERROR}); "
                      "install the package with `pip install .`")

__all__ = [
    "pack_int4",
    "unpack_int4",
    "quantize_int4",
    "w4a4_gemm",
    "w4a4_linear",
    "prepack_int4",
    "w4a4_linear_prepacked",
    "weighted_mse",
    "cpu_isa",
    "get_cpu_isa",
    "set_cpu_isa",
    "cpu_isa_supported",
    "CPU_ISAS",
]

CPU_ISAS = ("scalar", "avx2", "avx512_vnni", "amx")

_FLOAT_IN = (torch.float32, torch.bfloat16, torch.float16)
_GEMM_OUT = (torch.float32, torch.bfloat16, torch.float16, torch.int32)


# ---- wrappers ---------------------------------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Packs int8 values in [-8, 7] of shape ``[..., K]`` (K even) into ``uint8 [..., K/2]``."""
    return torch.ops.fair.pack_int4.default(q)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 [..., K/2]`` -> ``int8 [..., K]``."""
    return torch.ops.fair.unpack_int4.default(packed)


def quantize_int4(x: torch.Tensor, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int4 quantization of ``x [..., K]`` (float, K even).

    Returns ``(packed uint8 [..., K/2], scale fp32 [...])`` with ``scale = clip*absmax/7``
    (1.0 for all-zero rows) and ``q = clamp(round_half_even(x.float() / scale), -8, 7)``.
    inf/NaN input raises ``RuntimeError``, and so does a row whose scale overflows float32
    (``clip > 1`` with |x| near float32's maximum) instead of giving an inf scale and zero codes.
    """
    return torch.ops.fair.quantize_int4.default(x, float(clip))


def w4a4_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Int4 x int4 GEMM with exact int32 accumulation.

    ``a`` packed ``[M, K/2]``, ``w`` packed ``[N, K/2]``, fp32 scales ``a_scale [M]`` and
    ``w_scale [N]``; returns ``[M, N]`` = ``(acc * a_scale[m]) * w_scale[n] (+ bias[n])`` in
    ``out_dtype``. ``out_dtype=torch.int32`` returns the raw accumulator (no scales, no bias).
    """
    return torch.ops.fair.w4a4_gemm.default(a, a_scale, w, w_scale, bias, out_dtype)


def w4a4_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_clip: float = 1.0,
) -> torch.Tensor:
    """W4A4 linear layer: per-token int4 quantization of ``x [..., K]`` fused with the GEMM.

    ``w`` packed ``[N, K/2]`` with fp32 ``w_scale [N]``; returns ``[..., N]`` in ``x.dtype``.
    Differentiable: ``x`` gets the straight-through gradient ``grad @ dequant(w)`` (the
    activation quantizer taken as the identity), ``bias`` and ``w_scale`` their exact ones;
    the integer ``w`` has none.
    """
    return torch.ops.fair.w4a4_linear.default(x, w, w_scale, bias, float(act_clip))


def prepack_int4(w: torch.Tensor) -> torch.Tensor:
    """The CPU kernels' prepacked form of public packed weights ``w`` uint8 ``[N, K/2]``.

    Returns uint8 ``[ceil(N/64), Kp/4, 128]`` (``Kp`` = K rounded up to 64): still 4 bits per
    weight, reordered once into the GEMM's panel order (``csrc/cpu/isa.h``). For
    :func:`w4a4_linear_prepacked`; the public layout stays the checkpoint format.
    """
    return torch.ops.fair.prepack_int4.default(w)


def w4a4_linear_prepacked(
    x: torch.Tensor,
    w_prepacked: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_clip: float = 1.0,
    *,
    in_features: int,
) -> torch.Tensor:
    """:func:`w4a4_linear` on ``prepack_int4(w)``: the same result bit for bit, without the
    per-call reordering of the weights. ``N = w_scale.shape[0]``, ``K = in_features``.

    The prepacked layout pads K to a multiple of 64, so the op alone cannot tell K=62 from K=64
    (it would treat the missing columns as zeros): ``in_features``, the K the weights were packed
    for, is required and ``x.shape[-1]`` must equal it.
    """
    if x.shape[-1] != in_features:
        raise ValueError(f"w4a4_linear_prepacked: x's last dimension is {x.shape[-1]}, expected in_features="
                         f"{in_features} (the K the weights were packed for; x shape {tuple(x.shape)})")
    return torch.ops.fair.w4a4_linear_prepacked.default(x, w_prepacked, w_scale, bias, float(act_clip))


def weighted_mse(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i * ||a_i - b_i||^2`` over positions i of ``a, b [..., N, D]``.

    ``w`` broadcasts to ``a.shape[:-1]`` (typically ``[N]``). Differentiable in ``a``, ``b``
    and ``w``; returns a 0-dim tensor of ``a.dtype`` (inf when the sum exceeds that dtype).
    """
    return torch.ops.fair.weighted_mse.default(a, b, w)


# ---- CPU kernel path ----------------------------------------------------------------------------


def get_cpu_isa() -> str:
    """Name of the CPU kernel path the ops use now."""
    return _C._get_cpu_isa()


def set_cpu_isa(name: str) -> str:
    """Forces a CPU kernel path (``"auto"`` = best supported); returns the previous one.

    Raises ``ValueError`` for an unknown name or a path this CPU/build lacks. The environment
    variable ``FAIR_CPU_ISA`` sets the initial choice the same way.
    """
    return _C._set_cpu_isa(name)


def cpu_isa_supported(name: str) -> bool:
    """Whether the CPU kernel path ``name`` is compiled in and runs on this CPU."""
    return name in _C.build_info()["cpu_isa_supported"]


@contextlib.contextmanager
def cpu_isa(name: str) -> Iterator[None]:
    """Context manager running the ops on one CPU kernel path (for tests and benchmarks)."""
    prev = set_cpu_isa(name)
    try:
        yield
    finally:
        set_cpu_isa(prev)


# ---- fake kernels ---------------------------------------------------------------------------------


def _check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        torch._check(
            dev == first,
            lambda: f"fair::{op}: all tensors must be on the same device; {name} is on {dev}, "
            f"{first_name} on {first}",
        )


@torch.library.register_fake("fair::pack_int4")
def _pack_int4_fake(q: torch.Tensor) -> torch.Tensor:
    torch._check(q.dtype == torch.int8, lambda: f"fair::pack_int4: q must be int8, got {q.dtype}")
    torch._check(q.dim() >= 1, lambda: "fair::pack_int4: q must have at least one dimension")
    torch._check(
        q.shape[-1] % 2 == 0,
        lambda: f"fair::pack_int4: q's last dimension K must be even, got K={q.shape[-1]}",
    )
    return q.new_empty((*q.shape[:-1], q.shape[-1] // 2), dtype=torch.uint8)


@torch.library.register_fake("fair::unpack_int4")
def _unpack_int4_fake(packed: torch.Tensor) -> torch.Tensor:
    torch._check(
        packed.dtype == torch.uint8,
        lambda: f"fair::unpack_int4: packed must be uint8, got {packed.dtype}",
    )
    torch._check(packed.dim() >= 1, lambda: "fair::unpack_int4: packed must be at least 1-D")
    return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=torch.int8)


@torch.library.register_fake("fair::quantize_int4")
def _quantize_int4_fake(x: torch.Tensor, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(
        x.dtype in (*_FLOAT_IN, torch.float64),
        lambda: f"fair::quantize_int4: x must be float32, bfloat16, float16 or float64, got {x.dtype}",
    )
    torch._check(x.dim() >= 1, lambda: "fair::quantize_int4: x must have at least one dimension")
    torch._check(
        x.shape[-1] % 2 == 0,
        lambda: f"fair::quantize_int4: x's last dimension K must be even, got K={x.shape[-1]}",
    )
    packed = x.new_empty((*x.shape[:-1], x.shape[-1] // 2), dtype=torch.uint8)
    scale = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return packed, scale


def _check_weight_fake(op: str, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    torch._check(w.dtype == torch.uint8, lambda: f"fair::{op}: w must be uint8 (packed int4), got {w.dtype}")
    torch._check(w.dim() == 2, lambda: f"fair::{op}: w must be 2-D [N, K/2], got shape {tuple(w.shape)}")
    torch._check(
        w_scale.dtype == torch.float32, lambda: f"fair::{op}: w_scale must be float32, got {w_scale.dtype}"
    )
    torch._check(
        w_scale.dim() == 1 and w_scale.shape[0] == w.shape[0],
        lambda: f"fair::{op}: w_scale must have shape [N] = [{w.shape[0]}], got {tuple(w_scale.shape)}",
    )
    if bias is not None:
        torch._check(
            bias.dim() == 1 and bias.shape[0] == w.shape[0],
            lambda: f"fair::{op}: bias must have shape [N] = [{w.shape[0]}], got {tuple(bias.shape)}",
        )


@torch.library.register_fake("fair::w4a4_gemm")
def _w4a4_gemm_fake(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    _check_same_device("w4a4_gemm", a=a, a_scale=a_scale, w=w, w_scale=w_scale, bias=bias)
    torch._check(a.dtype == torch.uint8, lambda: f"fair::w4a4_gemm: a must be uint8 (packed int4), got {a.dtype}")
    torch._check(a.dim() == 2, lambda: f"fair::w4a4_gemm: a must be 2-D [M, K/2], got shape {tuple(a.shape)}")
    _check_weight_fake("w4a4_gemm", w, w_scale, bias)
    torch._check(
        a.shape[1] == w.shape[1],
        lambda: f"fair::w4a4_gemm: a and w must have the same packed K/2, got a: {a.shape[1]} and w: {w.shape[1]}",
    )
    torch._check(
        a_scale.dtype == torch.float32 and a_scale.dim() == 1 and a_scale.shape[0] == a.shape[0],
        lambda: f"fair::w4a4_gemm: a_scale must be float32 of shape [M] = [{a.shape[0]}]",
    )
    torch._check(out_dtype in _GEMM_OUT, lambda: f"fair::w4a4_gemm: unsupported out_dtype {out_dtype}")
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


@torch.library.register_fake("fair::w4a4_linear")
def _w4a4_linear_fake(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    act_clip: float = 1.0,
) -> torch.Tensor:
    _check_same_device("w4a4_linear", x=x, w=w, w_scale=w_scale, bias=bias)
    torch._check(
        x.dtype in _FLOAT_IN, lambda: f"fair::w4a4_linear: x must be float32, bfloat16 or float16, got {x.dtype}"
    )
    _check_weight_fake("w4a4_linear", w, w_scale, bias)
    torch._check(
        x.shape[-1] == 2 * w.shape[1],
        lambda: f"fair::w4a4_linear: x's last dimension K={x.shape[-1]} must equal 2 * w.size(1) = {2 * w.shape[1]}",
    )
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _prepacked_shape(n: int, k: int) -> tuple[int, int, int]:
    return ((n + 63) // 64, (k + 63) // 64 * 16, 128)


@torch.library.register_fake("fair::prepack_int4")
def _prepack_int4_fake(w: torch.Tensor) -> torch.Tensor:
    torch._check(w.dtype == torch.uint8, lambda: f"fair::prepack_int4: w must be uint8 (packed int4), got {w.dtype}")
    torch._check(w.dim() == 2, lambda: f"fair::prepack_int4: w must be 2-D [N, K/2], got shape {tuple(w.shape)}")
    return w.new_empty(_prepacked_shape(w.shape[0], 2 * w.shape[1]))


@torch.library.register_fake("fair::w4a4_linear_prepacked")
def _w4a4_linear_prepacked_fake(
    x: torch.Tensor,
    w_prepacked: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    act_clip: float = 1.0,
) -> torch.Tensor:
    op = "w4a4_linear_prepacked"
    _check_same_device(op, x=x, w_prepacked=w_prepacked, w_scale=w_scale, bias=bias)
    torch._check(x.dtype in _FLOAT_IN, lambda: f"fair::{op}: x must be float32, bfloat16 or float16, got {x.dtype}")
    torch._check(
        w_scale.dtype == torch.float32 and w_scale.dim() == 1,
        lambda: f"fair::{op}: w_scale must be float32 of shape [N]",
    )
    n, k = w_scale.shape[0], x.shape[-1]
    torch._check(
        w_prepacked.dtype == torch.uint8 and tuple(w_prepacked.shape) == _prepacked_shape(n, k),
        lambda: f"fair::{op}: w_prepacked must be the uint8 output of prepack_int4 for N={n} and K={k}, "
        f"shape {_prepacked_shape(n, k)}, got {w_prepacked.dtype} {tuple(w_prepacked.shape)}",
    )
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == n, lambda: f"fair::{op}: bias must have shape [N] = [{n}]")
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("fair::weighted_mse")
def _weighted_mse_fake(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    _check_same_device("weighted_mse", a=a, b=b, w=w)
    torch._check(a.shape == b.shape, lambda: "fair::weighted_mse: a and b must have the same shape")
    torch._check(a.dim() >= 2, lambda: "fair::weighted_mse: a must be [..., N, D]")
    return a.new_empty(())


@torch.library.register_fake("fair::weighted_mse_backward")
def _weighted_mse_backward_fake(
    grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_same_device("weighted_mse_backward", grad=grad, a=a, b=b, w=w)
    return torch.empty_like(a), torch.empty_like(b)


# ---- autograd -------------------------------------------------------------------------------------


def _weighted_mse_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    a, b, w = inputs
    ctx.save_for_backward(a, b, w)


def _weighted_mse_backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202
    a, b, w = ctx.saved_tensors
    grad_a = grad_b = grad_w = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        grad_a, grad_b = torch.ops.fair.weighted_mse_backward.default(grad, a, b, w)
    if ctx.needs_input_grad[2]:
        # d/dw_i = g * ||a_i - b_i||^2, summed over the dims that w was broadcast along
        sq = (a - b).to(w.dtype).pow(2).sum(-1)
        grad_w = (grad.to(w.dtype) * sq).sum_to_size(w.shape)
    return grad_a, grad_b, grad_w


torch.library.register_autograd(
    "fair::weighted_mse", _weighted_mse_backward, setup_context=_weighted_mse_setup_context
)


def _w4a4_linear_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, w, w_scale, bias, act_clip = inputs
    ctx.save_for_backward(x, w, w_scale)
    ctx.act_clip = act_clip
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _w4a4_linear_backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202
    # out = Q(x) @ dequant(w)^T + bias with Q the per-token int4 quantizer. Q is piecewise
    # constant, so x gets the straight-through gradient (Q taken as the identity), as in the
    # fake-quant path used for calibration; w holds integer codes and gets no gradient.
    x, w, w_scale = ctx.saved_tensors
    n, k = w.shape[0], 2 * w.shape[1]
    g = grad.float().reshape(-1, n)  # [M, N]
    codes = unpack_int4(w).float()  # [N, K]
    grad_x = grad_scale = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = (g @ (codes * w_scale[:, None])).reshape(x.shape).to(x.dtype)
    if ctx.needs_input_grad[2]:
        # d out[m, n] / d w_scale[n] = Q(x)[m] . codes[n]
        qx, sx = quantize_int4(x.detach().reshape(-1, k), ctx.act_clip)
        xq = unpack_int4(qx).float() * sx[:, None]
        grad_scale = (g * (xq @ codes.T)).sum(0)
    if ctx.needs_input_grad[3]:
        grad_bias = g.sum(0).to(ctx.bias_dtype)
    return grad_x, None, grad_scale, grad_bias, None


torch.library.register_autograd(
    "fair::w4a4_linear", _w4a4_linear_backward, setup_context=_w4a4_linear_setup_context
)
