"""Pure-torch references of the fair ops, shared by the CPU and CUDA op tests."""

from __future__ import annotations

import torch

__all__ = ["ref_quantize", "ref_pack", "exact_acc", "epilogue", "rand_codes", "isa_params"]


def ref_quantize(x: torch.Tensor, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference int4 quantizer (docs/kernels.md): codes int8 [..., K] and fp32 scale [...]."""
    x32 = x.float()
    scale = (clip * x32.abs().amax(dim=-1)) / 7.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(x32 / scale[..., None]), -8, 7).to(torch.int8)
    return q, scale


def ref_pack(q: torch.Tensor) -> torch.Tensor:
    u = q.to(torch.int16) & 0xF
    return (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8)


def exact_acc(qa: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """int32 oracle: float64 matmul of int4 codes is exact (|acc| <= 64 K << 2^53).

    Runs on one thread: on a busy 2-core machine a threaded BLAS call on these tiny matrices can
    stall for a long time in the thread pool."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return (qa.double() @ qw.double().T).to(torch.int32)
    finally:
        torch.set_num_threads(prev)


def epilogue(acc, a_scale, w_scale, bias, dtype):
    """The kernel's defined fp32 epilogue: ((acc * a_scale[m]) * w_scale[n]) + bias[n]."""
    out = (acc.float() * a_scale[:, None]) * w_scale[None, :]
    if bias is not None:
        out = out + bias.float()[None, :]
    return out.to(dtype)


def rand_codes(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-8, 8, shape, dtype=torch.int8, generator=gen)


def isa_params() -> list:
    """One pytest param per CPU ISA path, skipped where this CPU/build lacks it."""
    import pytest

    import fair_calib_ext
    from fair_calib_ext import ops

    info = fair_calib_ext.build_info()
    params = []
    for name in ops.CPU_ISAS:
        reason = None
        if name not in info["cpu_isa_compiled"]:
            reason = f"{name} path not compiled in this build"
        elif name not in info["cpu_isa_supported"]:
            reason = f"this CPU lacks {name} (supported: {info['cpu_isa_supported']})"
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params
