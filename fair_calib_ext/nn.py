"""Modules running on the int4 kernels: :class:`W4A4Linear`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import ops
from .validate import check_float, check_int

__all__ = ["W4A4Linear", "quantize_weight", "unprepack_int4"]

_BLOCK_N, _K_ALIGN = 64, 64  # the CPU prepacked layout (csrc/cpu/isa.h): 64-channel blocks, K padded to 64


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


def unprepack_int4(w_prepacked: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`fair_calib_ext.ops.prepack_int4`: the public packed layout uint8 [N, K/2].

    The prepacked layout (csrc/cpu/isa.h) is a fixed permutation of the nibbles, so this is
    exact; it is what a W4A4Linear that holds only the prepacked copy writes to its state dict.
    """
    nb, kp = -(-n // _BLOCK_N), -(-k // _K_ALIGN) * _K_ALIGN
    if w_prepacked.dtype != torch.uint8 or tuple(w_prepacked.shape) != (nb, kp // 4, 128):
        raise ValueError(f"w_prepacked must be uint8 [{nb}, {kp // 4}, 128] for N={n}, K={k}, got "
                         f"{w_prepacked.dtype} {tuple(w_prepacked.shape)}")
    x = w_prepacked.reshape(nb, kp // 4, 2, 16, 4)  # [block, quad, h, j, t]
    u = torch.stack((x & 15, x >> 4), dim=3)  # [block, quad, h, g, j, t]: channel 64b + 32h + 16g + j
    u = u.permute(0, 2, 3, 4, 1, 5).reshape(nb * _BLOCK_N, kp)[:n, :k]  # [channel, k], u = w + 8
    return (u[:, 0::2] ^ 8) | ((u[:, 1::2] ^ 8) << 4)  # w + 8 -> two's-complement nibble: flip bit 3


class W4A4Linear(nn.Module):
    """Linear layer with int4 weights (per output channel) and int4 activations (per token).

    State dict: ``weight_packed`` uint8 ``[N, K/2]`` (the public :func:`fair_calib_ext.ops.pack_int4`
    layout), ``weight_scale`` fp32 ``[N]``, ``bias`` (optional, ``[N]``). ``forward(x [..., K])
    -> [..., N]`` in ``x.dtype``, activations quantized per token with ``act_clip``.

    The layer holds exactly one copy of its int4 weights. On CPU that is the kernels' prepacked
    form (:func:`fair_calib_ext.ops.prepack_int4`, 4 bits per weight, made when the weights are
    set or loaded) and forward runs :func:`fair_calib_ext.ops.w4a4_linear_prepacked`; elsewhere
    it is the public layout and forward runs :func:`fair_calib_ext.ops.w4a4_linear`. On CPU,
    ``weight_packed`` is computed from the prepacked copy (exactly) and returned as an
    inference tensor, so an in-place edit raises instead of being lost: assign a new tensor to
    ``weight_packed`` to change the weights.
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
        in_features = check_int(in_features, "W4A4Linear: in_features", lo=0)
        if in_features % 2:
            raise ValueError(f"in_features must be even for int4 packing, got {in_features}")
        self.in_features = in_features
        self.out_features = check_int(out_features, "W4A4Linear: out_features", lo=0)
        # the activation scale is act_clip * absmax / 7: a non-finite or non-positive clip gives garbage
        self.act_clip = check_float(act_clip, "W4A4Linear: act_clip", lo=0.0, lo_open=True)
        self._w_public: torch.Tensor | None = None
        self._w_prepacked: torch.Tensor | None = None
        self.weight_packed = torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    # -- the one copy of the weights ------------------------------------------------------------
    @property
    def weight_packed(self) -> torch.Tensor:
        """Public packed weights uint8 [N, K/2] (on CPU: made from the prepacked copy)."""
        if self._w_public is not None:
            return self._w_public
        with torch.inference_mode():
            return unprepack_int4(self._w_prepacked, self.out_features, self.in_features)

    @weight_packed.setter
    def weight_packed(self, w: torch.Tensor) -> None:
        shape = (self.out_features, self.in_features // 2)
        if not isinstance(w, torch.Tensor) or w.dtype != torch.uint8 or tuple(w.shape) != shape:
            raise ValueError(f"weight_packed must be a uint8 tensor of shape {list(shape)} (packed int4), got "
                             f"{getattr(w, 'dtype', type(w).__name__)} {list(getattr(w, 'shape', []))}")
        w = w.detach()
        if w.device.type == "cpu":
            self._w_prepacked, self._w_public = ops.prepack_int4(w.contiguous()), None
        else:
            self._w_public, self._w_prepacked = w, None

    @property
    def prepacked(self) -> torch.Tensor | None:
        """The CPU prepacked weights (None off the CPU)."""
        return self._w_prepacked

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - .to() / .cuda() / .cpu()
        super()._apply(fn, recurse)
        target = fn(torch.empty(0, dtype=torch.uint8, device=self.weight_scale.device))
        if self._w_prepacked is not None and target.device.type != "cpu":
            self.weight_packed = fn(self.weight_packed.clone())  # leaves the CPU: public layout
        elif self._w_public is not None:
            self.weight_packed = fn(self._w_public)  # to the CPU: prepacked there
        return self

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        w = self.weight_packed
        destination[prefix + "weight_packed"] = w.clone() if w.is_inference() else w
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # noqa: ANN001
                              unexpected_keys, error_msgs) -> None:
        key = prefix + "weight_packed"
        if key in state_dict:
            w = state_dict.pop(key)  # load_state_dict passes its own copy of the dict
            shape = (self.out_features, self.in_features // 2)
            if not isinstance(w, torch.Tensor) or w.dtype != torch.uint8 or tuple(w.shape) != shape:
                error_msgs.append(f"{key}: expected uint8 {list(shape)}, got "
                                  f"{getattr(w, 'dtype', type(w).__name__)} {list(getattr(w, 'shape', []))}")
            else:
                dev = self.weight_scale.device
                self.weight_packed = w if (local_metadata.get("assign_to_params_buffers") or dev.type == "meta") \
                    else w.to(dev)
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # -- construction and use ---------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls, linear: nn.Linear, w_clip: float | torch.Tensor = 1.0, act_clip: float = 1.0
    ) -> W4A4Linear:
        """Quantizes ``linear``'s weight per output channel (clip ratio ``w_clip``: float or
        ``Tensor[N]``); the bias is kept in fp32."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"W4A4Linear.from_linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        if not isinstance(w_clip, torch.Tensor):
            w_clip = check_float(w_clip, "W4A4Linear.from_linear: w_clip", lo=0.0, lo_open=True)
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, act_clip=act_clip,
                  device=linear.weight.device)
        packed, scale = quantize_weight(linear.weight, w_clip)
        mod.weight_packed = packed
        mod.weight_scale.copy_(scale)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach().float())
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight ``[N, K]`` this layer multiplies with (int4 codes times scales)."""
        return ops.unpack_int4(self.weight_packed).float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"W4A4Linear: input's last dimension is {x.shape[-1]}, expected in_features="
                             f"{self.in_features} (input shape {tuple(x.shape)})")
        if self._w_prepacked is not None:
            return ops.w4a4_linear_prepacked(x, self._w_prepacked, self.weight_scale, self.bias, self.act_clip,
                                             in_features=self.in_features)
        return ops.w4a4_linear(x, self._w_public, self.weight_scale, self.bias, self.act_clip)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, act_clip={self.act_clip}"
        )
