"""Modules running on the int4 kernels: :class:`W4A4Linear`."""

from __future__ import annotations

import torch
from torch import nn

from . import ops

__all__ = ["W4A4Linear", "quantize_weight"]


def quantize_weight(
    weight: torch.Tensor, w_clip: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int4 quantization of ``weight [N, K]`` (K even).

    ``w_clip`` is a float or a ``Tensor[N]`` of per-channel clip ratios (learnable weight
    clipping). Returns ``(packed uint8 [N, K/2], scale fp32 [N])`` with
    ``scale = (w_clip * absmax) / 7`` in fp32 (1.0 where that is 0) and
    ``q = clamp(round_half_even(w.float() / scale), -8, 7)``, the contract of
    :func:`fair_calib_ext.ops.quantize_int4`.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if weight.shape[1] % 2:
        raise ValueError(f"in_features K must be even for int4 packing, got K={weight.shape[1]}")
    w = weight.detach()
    if not isinstance(w_clip, torch.Tensor):
        return ops.quantize_int4(w, float(w_clip))
    clip = w_clip.detach().to(device=w.device, dtype=torch.float32).reshape(-1)
    if clip.numel() != w.shape[0]:
        raise ValueError(f"w_clip must be a float or a Tensor[N] with N={w.shape[0]}, got {tuple(w_clip.shape)}")
    w32 = w.float()
    if not torch.isfinite(w32).all():
        raise ValueError("weight has inf or NaN; quantization needs finite input")
    if not (torch.isfinite(clip).all() and (clip > 0).all()):
        raise ValueError("w_clip must be finite and > 0")
    scale = (clip * w32.abs().amax(dim=1)) / 7.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(w32 / scale[:, None]), -8, 7).to(torch.int8)
    return ops.pack_int4(q), scale


def _prepack_after_load(module: W4A4Linear, incompatible_keys: object) -> None:
    module.prepack()


def _version(t: torch.Tensor) -> int:
    """The tensor's in-place version counter; -1 for inference tensors, which have none (an
    in-place edit of an inference-mode weight is then not noticed: call ``prepack()``)."""
    return -1 if t.is_inference() else t._version


class W4A4Linear(nn.Module):
    """Linear layer with int4 weights (per output channel) and int4 activations (per token).

    Buffers: ``weight_packed`` uint8 ``[N, K/2]``, ``weight_scale`` fp32 ``[N]``, ``bias``
    (optional, ``[N]``). ``forward(x [..., K]) -> [..., N]`` in ``x.dtype`` via
    :func:`fair_calib_ext.ops.w4a4_linear` (activation quantization with ``act_clip``).

    On CPU the layer also holds the kernels' prepacked form of the weights
    (:func:`fair_calib_ext.ops.prepack_int4`, still 4 bits per weight, not in the state dict),
    made once by :meth:`from_linear`, after ``load_state_dict`` and whenever ``weight_packed``
    was replaced or modified in place; forward then runs
    :func:`fair_calib_ext.ops.w4a4_linear_prepacked` (same result bit for bit, no per-call
    reordering). On CUDA and under ``torch.compile`` it runs ``w4a4_linear`` on the public layout.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        act_clip: float = 1.0,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if in_features % 2:
            raise ValueError(f"in_features must be even for int4 packing, got {in_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.act_clip = float(act_clip)
        self.register_buffer(
            "weight_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None
        # CPU prepacked weights and the (tensor, version) they were made from
        self._prepacked: torch.Tensor | None = None
        self._prepacked_src: tuple[torch.Tensor, int] | None = None
        self.register_load_state_dict_post_hook(_prepack_after_load)

    def prepack(self) -> None:
        """(Re)makes the CPU prepacked weights from ``weight_packed`` (no-op off CPU)."""
        w = self.weight_packed
        if w.device.type != "cpu":
            self._prepacked = self._prepacked_src = None
            return
        self._prepacked = ops.prepack_int4(w)
        self._prepacked_src = (w, _version(w))

    def _apply(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - .to() / .cuda() / .cpu()
        out = super()._apply(*args, **kwargs)
        if self.weight_packed.device.type != "cpu":  # moved off the CPU: free the CPU-only copy
            self._prepacked = self._prepacked_src = None
        return out

    def _current_prepacked(self) -> torch.Tensor:
        w = self.weight_packed
        src = self._prepacked_src
        if src is None or src[0] is not w or src[1] != _version(w):
            self.prepack()
        assert self._prepacked is not None
        return self._prepacked

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, w_clip: float | torch.Tensor = 1.0, act_clip: float = 1.0
    ) -> W4A4Linear:
        """Quantizes ``linear``'s weight per output channel (clip ratio ``w_clip``: float or
        ``Tensor[N]``); the bias is kept in fp32."""
        mod = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            act_clip=act_clip,
            device=linear.weight.device,
        )
        packed, scale = quantize_weight(linear.weight, w_clip)
        mod.weight_packed.copy_(packed)
        mod.weight_scale.copy_(scale)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach().float())
        mod.prepack()
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight ``[N, K]`` this layer multiplies with (int4 codes times scales)."""
        return ops.unpack_int4(self.weight_packed).float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self.weight_packed.device.type == "cpu" and not torch.compiler.is_compiling():
            return ops.w4a4_linear_prepacked(
                x, self._current_prepacked(), self.weight_scale, self.bias, self.act_clip
            )
        return ops.w4a4_linear(x, self.weight_packed, self.weight_scale, self.bias, self.act_clip)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, act_clip={self.act_clip}"
        )
