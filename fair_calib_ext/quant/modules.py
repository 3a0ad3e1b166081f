"""Deployed quantized modules: an online per-token transform followed by a quantized linear.

``QuantLinear`` replaces an ``nn.Linear`` of a calibrated block:

    y = Linear_q( T(x) )      T: OnlineTransform or identity (fp32 compute, cast back)

Linear_q is ``fair_calib_ext.nn.W4A4Linear`` (real int4 kernels, ``torch.ops.fair.w4a4_linear``;
on CPU on weights prepacked once into the kernel layout)
for W4A4 when the extension is built, otherwise :class:`RefQuantLinear`, the pure-torch reference
with the same buffers (packed int4 weights + fp32 scales), used for W4A8 / W8A8 / W4A16 and
as a fallback (a W4A4 fallback warns once per process; :func:`kernel_path` says which ran).
Both hold the weights exactly as quantized by the method (RTN or GPTQ): the scales are stored,
never recomputed from dequantized values.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .. import _ext
from .hadamard import hadamard_transform
from .quantizer import check_codes, dequantize, fake_quant, pack_int4_ref, unpack_int4_ref

__all__ = ["OnlineTransform", "RefQuantLinear", "QuantLinear", "PendingLinear", "kron_apply", "kernels_available",
           "kernel_path", "kernel_report"]


def kernels_available() -> bool:
    """True when the compiled ``fair`` ops (``fair_calib_ext._C``) loaded."""
    return _ext.available()


_FALLBACK_WARNED = False  # one warning per process, however many layers fall back


def _warn_fallback() -> None:
    global _FALLBACK_WARNED
    if _FALLBACK_WARNED:
        return
    _FALLBACK_WARNED = True
    warnings.warn(
        f"fair_calib_ext._C did not load ({_ext.ERROR!r}): W4A4 layers run on the pure-torch "
        "fake-quant reference, not on the int4 kernels (same numerics up to fp32 rounding, much "
        "slower); install the package with `pip install .` to build the kernels",
        UserWarning, stacklevel=3)


def kernel_path(module: nn.Module | None = None) -> str:
    """Which code runs the W4A4 matmuls.

    With ``module``: over its W4A4 :class:`QuantLinear` layers, ``"kernels"`` (all on
    ``torch.ops.fair.w4a4_linear``), ``"reference"`` (all on the pure-torch fake-quant
    reference), ``"mixed"``, or ``"none"`` (no W4A4 layer). Without: what a new W4A4 layer
    would use now (``"kernels"`` or ``"reference"``).
    """
    if module is None:
        return "kernels" if kernels_available() else "reference"
    paths = {m.uses_kernels for m in module.modules()
             if isinstance(m, QuantLinear) and m.w_bits == 4 and m.a_bits == 4}
    if not paths:
        return "none"
    if len(paths) == 2:
        return "mixed"
    return "kernels" if paths.pop() else "reference"


def kernel_report(module: nn.Module | None = None) -> dict[str, Any]:
    """What calibration/evaluation logs record about the int4 path: ``kernel_path`` (see
    :func:`kernel_path`), ``cpu_isa`` (the CPU kernel path in use, None without the extension)
    and ``extension_error`` (why ``fair_calib_ext._C`` did not load, else None)."""
    isa = None
    if kernels_available():
        from .. import ops

        isa = ops.get_cpu_isa()
    err = _ext.ERROR
    return {"kernel_path": kernel_path(module), "cpu_isa": isa,
            "extension_error": repr(err) if err is not None else None}


def kron_apply(x: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    """x [..., n1*n2] -> x (left ⊗ right), computed as leftᵀ X right on X = x.view(..., n1, n2).

    ``left`` [n1, n1] or None (identity), ``right`` [n2, n2] or None (identity); at least one
    must be given so the split n = n1 * n2 is known.
    """
    n = x.shape[-1]
    if left is None and right is None:
        return x
    n1 = left.shape[0] if left is not None else n // right.shape[0]  # type: ignore[union-attr]
    n2 = n // n1
    xv = x.reshape(-1, n1, n2)
    if right is not None:  # one GEMM over all tokens: [T*n1, n2] @ [n2, n2]
        xv = (xv.reshape(-1, n2) @ right).reshape(-1, n1, n2)
    if left is not None:  # leftᵀ X per token, as one GEMM: (Xᵀ left)ᵀ
        xt = xv.transpose(1, 2).reshape(-1, n1) @ left
        xv = xt.reshape(-1, n2, n1).transpose(1, 2)
    return xv.reshape(x.shape)


class OnlineTransform(nn.Module):
    """Per-token transform applied to a linear's input at run time (fp32, cast back).

    kinds:
      - "kron":     x (A ⊗ B) with buffers ``left`` A [n1, n1] and/or ``right`` B [n2, n2]
                    (FlatQuant's P_a, P_ug, P_d; P_o ⊗ I before o_proj; QuaRot's H_nh ⊗ I)
      - "hadamard": x H_n / normalised fast Walsh–Hadamard transform (QuaRot before down_proj)
    """

    def __init__(self, kind: str, size: int, n1: int | None = None, n2: int | None = None,
                 has_left: bool = True, has_right: bool = True) -> None:
        super().__init__()
        if kind not in ("kron", "hadamard"):
            raise ValueError(f"unknown online transform kind {kind!r}")
        self.kind, self.size = kind, size
        self.n1, self.n2 = n1, n2
        if kind == "kron":
            if n1 is None or n2 is None or n1 * n2 != size:
                raise ValueError(f"kron transform needs n1*n2 == size, got {n1}x{n2} for {size}")
            self.register_buffer("left", torch.eye(n1) if has_left else None)
            self.register_buffer("right", torch.eye(n2) if has_right else None)

    @classmethod
    def kron(cls, left: torch.Tensor | None, right: torch.Tensor | None, size: int) -> "OnlineTransform":
        """Build from matrices (copied to fp32)."""
        n1 = left.shape[0] if left is not None else size // right.shape[0]  # type: ignore[union-attr]
        m = cls("kron", size, n1, size // n1, left is not None, right is not None)
        if left is not None:
            m.left = left.detach().float().clone()
        if right is not None:
            m.right = right.detach().float().clone()
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "hadamard":
            return hadamard_transform(x)
        return kron_apply(x.float(), self.left, self.right).to(x.dtype)

    def spec(self) -> dict[str, Any]:
        """JSON description (the buffers travel in the state dict)."""
        d: dict[str, Any] = {"kind": self.kind, "size": self.size}
        if self.kind == "kron":
            d.update(n1=self.n1, n2=self.n2, has_left=self.left is not None, has_right=self.right is not None)
        return d

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "OnlineTransform":
        return cls(spec["kind"], spec["size"], spec.get("n1"), spec.get("n2"),
                   spec.get("has_left", True), spec.get("has_right", True))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, size={self.size}" + (f", {self.n1}x{self.n2}" if self.kind == "kron" else "")


def _check_in_features(x: torch.Tensor, in_features: int, layer: str) -> None:
    if x.shape[-1] != in_features:
        raise ValueError(f"{layer}: input's last dimension is {x.shape[-1]}, expected in_features={in_features} "
                         f"(input shape {tuple(x.shape)})")


class RefQuantLinear(nn.Module):
    """Pure-torch quantized linear with the deployed buffers.

    Buffers: w_bits 4 -> ``weight_packed`` uint8 [N, K/2] (low nibble = even column, the
    kernel layout); 8 -> ``weight_q`` int8 [N, K]; 16 -> ``weight`` fp32 [N, K].
    ``weight_scale`` fp32 [N]; optional ``bias`` fp32 [N]. Forward: per-token dynamic
    fake-quant of x (a_bits, act_clip), then x_q @ dequant(W)ᵀ + bias in fp32, cast to x.dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, w_bits: int = 4,
                 a_bits: int = 4, act_clip: float = 1.0) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.a_bits, self.act_clip = w_bits, a_bits, float(act_clip)
        if w_bits == 4:
            self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        elif w_bits == 8:
            self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8))
        else:
            self.register_buffer("weight", torch.zeros(out_features, in_features))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def set_weight(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        """Store integer weights q [N, K] (or fp weights when w_bits == 16) and scales [N]."""
        if self.w_bits == 4:
            self.weight_packed = pack_int4_ref(q)  # range-checked: never wraps a code
        elif self.w_bits == 8:
            check_codes(q, 8)
            self.weight_q = q.to(torch.int8).contiguous()
        else:
            self.weight = q.float().contiguous()
        self.weight_scale = scale.float().contiguous()

    def int_weight(self) -> torch.Tensor:
        if self.w_bits == 4:
            return unpack_int4_ref(self.weight_packed)
        if self.w_bits == 8:
            return self.weight_q
        return self.weight

    def dequant_weight(self) -> torch.Tensor:
        """fp32 [N, K]."""
        if self.w_bits == 16:
            return self.weight.float()
        return dequantize(self.int_weight(), self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_in_features(x, self.in_features, "RefQuantLinear")
        xq = fake_quant(x.float(), self.a_bits, self.act_clip)
        y = xq @ self.dequant_weight().T
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w{self.w_bits}a{self.a_bits}, "
                f"act_clip={self.act_clip:.4f}, bias={self.bias is not None}")


class QuantLinear(nn.Module):
    """Online transform (optional) + quantized linear; the unit every method produces."""

    def __init__(self, in_features: int, out_features: int, bias: bool, w_bits: int = 4,
                 a_bits: int = 4, act_clip: float = 1.0, transform: OnlineTransform | None = None,
                 use_kernels: bool | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.a_bits, self.act_clip = w_bits, a_bits, float(act_clip)
        self.transform = transform
        w4a4 = w_bits == 4 and a_bits == 4
        if use_kernels is None:
            use_kernels = kernels_available()
            if w4a4 and not use_kernels:  # not asked for: say so, once
                _warn_fallback()
        self.uses_kernels = bool(use_kernels and w4a4)
        if self.uses_kernels:
            from ..nn import W4A4Linear

            self.linear: nn.Module = W4A4Linear(in_features, out_features, bias=bias, act_clip=float(act_clip))
        else:
            self.linear = RefQuantLinear(in_features, out_features, bias, w_bits, a_bits, act_clip)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, *,
                       w_bits: int, a_bits: int, act_clip: float,
                       transform: OnlineTransform | None = None,
                       use_kernels: bool | None = None) -> "QuantLinear":
        """Wrap integer weights q [N, K] + scales [N] (or fp weights when w_bits == 16)."""
        n, k = q.shape
        m = cls(k, n, bias is not None, w_bits, a_bits, act_clip, transform, use_kernels)
        if m.uses_kernels:
            lin = m.linear
            lin.weight_packed = _pack(q)  # on CPU the setter makes the kernel layout, once
            lin.weight_scale = scale.float().contiguous()
        else:
            m.linear.set_weight(q, scale)
        if bias is not None:
            m.linear.bias = bias.detach().float().clone()
        return m

    def int_weight(self) -> torch.Tensor:
        if self.uses_kernels:
            return unpack_int4_ref(self.linear.weight_packed)
        return self.linear.int_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_in_features(x, self.in_features, "QuantLinear")  # before a transform could broadcast it
        if self.transform is not None:
            x = self.transform(x)
        return self.linear(x)

    def spec(self) -> dict[str, Any]:
        """JSON metadata needed to rebuild the module before loading its state dict."""
        return {
            "in_features": self.in_features, "out_features": self.out_features,
            "bias": self.linear.bias is not None, "w_bits": self.w_bits, "a_bits": self.a_bits,
            "act_clip": self.act_clip,
            "transform": self.transform.spec() if self.transform is not None else None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], use_kernels: bool | None = None) -> "QuantLinear":
        t = OnlineTransform.from_spec(spec["transform"]) if spec.get("transform") else None
        return cls(spec["in_features"], spec["out_features"], spec["bias"], spec["w_bits"],
                   spec["a_bits"], spec["act_clip"], t, use_kernels)


def _pack(q: torch.Tensor) -> torch.Tensor:
    """int4 codes [N, K] -> packed uint8 [N, K/2]: the kernel's pack when the extension is
    built, else the reference (same layout). Out-of-range codes raise ValueError."""
    check_codes(q, 4)  # before the int8 cast, which could wrap a code into range
    if not kernels_available():
        return pack_int4_ref(q)
    from .. import ops

    return ops.pack_int4(q.to(torch.int8).contiguous())


class PendingLinear(nn.Module):
    """A transformed linear whose weights are not quantized yet (calibration-time unit).

    Holds the online transform, the folded fp32 weight W [N, K], bias, the weight clip ratio(s)
    and the activation clip. ``quant=False``: y = T(x) Wᵀ + b exactly (used to check that
    transforms are invertible and to collect GPTQ statistics); ``quant=True``: fake-quant of
    T(x) (a_bits, act_clip) and of W (w_bits, w_clip) — the numerics the deployed module has.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, w_bits: int, a_bits: int,
                 w_clip: float | torch.Tensor = 1.0, act_clip: float = 1.0,
                 transform: OnlineTransform | None = None, share: bool = False) -> None:
        super().__init__()
        # share=True: a read-only view of fp32 weights (a reference forward), no second copy
        own = (lambda t: t.detach().float()) if share else (lambda t: t.detach().float().clone())
        self.register_buffer("weight", own(weight))
        self.register_buffer("bias", own(bias) if bias is not None else None)
        self.w_bits, self.a_bits = w_bits, a_bits
        if isinstance(w_clip, torch.Tensor):  # per-row clip travels with the module
            self.register_buffer("w_clip", w_clip.detach().float().clone())
        else:
            self.w_clip = float(w_clip)
        self.act_clip = float(act_clip)
        self.transform = transform
        self.quant = False

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def transformed_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(x) if self.transform is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xt = self.transformed_input(x).float()
        w = self.weight
        if self.quant:
            xt = fake_quant(xt, self.a_bits, self.act_clip)
            w = fake_quant(w, self.w_bits, self.w_clip)
        y = xt @ w.T
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def to_quant_linear(self, q: torch.Tensor, scale: torch.Tensor,
                        use_kernels: bool | None = None) -> QuantLinear:
        """The deployed module for integer weights q [N, K] and scales [N]."""
        return QuantLinear.from_quantized(q, scale, self.bias, w_bits=self.w_bits, a_bits=self.a_bits,
                                          act_clip=self.act_clip, transform=self.transform,
                                          use_kernels=use_kernels)
