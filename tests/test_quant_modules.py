"""Deployed quantized modules (quant/modules.py): codes are range-checked before packing, and a
W4A4 layer that cannot use the int4 kernels says so once and is visible in ``kernel_path``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fair_calib_ext
from fair_calib_ext.quant import modules
from fair_calib_ext.quant.modules import QuantLinear, kernel_path, kernel_report
from fair_calib_ext.quant.quantizer import pack_int4_ref, quantize_ref

needs_kernels = pytest.mark.skipif(fair_calib_ext._C is None, reason="fair_calib_ext._C not built")


def _codes(n: int = 3, k: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = quantize_ref(torch.randn(n, k, generator=torch.Generator().manual_seed(0)))
    return q, s


@pytest.mark.parametrize("use_kernels", [pytest.param(True, marks=needs_kernels), False])
@pytest.mark.parametrize("bad", [8, -9, 19])  # 19 would wrap to 3 in an int8 cast / 4-bit mask
def test_out_of_range_codes_are_refused_not_wrapped(use_kernels: bool, bad: int) -> None:
    q, s = _codes()
    q = q.to(torch.int64)
    q[1, 2] = bad
    with pytest.raises(ValueError, match=r"q.*\[-8, 7\]"):
        QuantLinear.from_quantized(q, s, None, w_bits=4, a_bits=4, act_clip=1.0, use_kernels=use_kernels)


def test_reference_pack_range_checks() -> None:
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4_ref(torch.tensor([[8, -9]], dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4_ref(torch.tensor([[3 + 16, 0]]))
    assert pack_int4_ref(torch.tensor([[-8, 7]])).tolist() == [[0x78]]


@needs_kernels
def test_kernel_pack_equals_reference_pack() -> None:
    q, s = _codes(5, 12)
    m = QuantLinear.from_quantized(q, s, None, w_bits=4, a_bits=4, act_clip=1.0, use_kernels=True)
    assert m.uses_kernels and torch.equal(m.linear.weight_packed, pack_int4_ref(q))


def test_fallback_warns_once_and_kernel_path_says_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the extension a W4A4 layer runs the fake-quant reference: one warning per process,
    and kernel_path/kernel_report record it (what calibrate/evaluate write to their logs)."""
    monkeypatch.setattr(modules, "kernels_available", lambda: False)
    monkeypatch.setattr(modules, "_FALLBACK_WARNED", False)
    q, s = _codes()
    with pytest.warns(UserWarning, match="fake-quant reference") as rec:
        layers = [QuantLinear.from_quantized(q, s, None, w_bits=4, a_bits=4, act_clip=1.0) for _ in range(3)]
    assert len([r for r in rec if "fake-quant reference" in str(r.message)]) == 1
    model = nn.Sequential(*layers)
    assert kernel_path(model) == "reference"
    assert kernel_path() == "reference"
    assert kernel_report(model)["kernel_path"] == "reference"
    with warnings.catch_warnings():  # a deliberate reference layer, or W4A8, is not a fallback
        warnings.simplefilter("error")
        monkeypatch.setattr(modules, "_FALLBACK_WARNED", False)
        QuantLinear.from_quantized(q, s, None, w_bits=4, a_bits=4, act_clip=1.0, use_kernels=False)
        QuantLinear.from_quantized(q, s, None, w_bits=4, a_bits=8, act_clip=1.0)


@needs_kernels
def test_kernel_path_of_a_model() -> None:
    q, s = _codes()
    on = QuantLinear.from_quantized(q, s, None, w_bits=4, a_bits=4, act_clip=1.0)
    off = QuantLinear.from_quantized(q, s, None, w_bits=4, a_bits=4, act_clip=1.0, use_kernels=False)
    assert kernel_path() == "kernels"
    assert kernel_path(nn.Sequential(on)) == "kernels"
    assert kernel_path(nn.Sequential(on, off)) == "mixed"
    assert kernel_path(nn.Sequential(off)) == "reference"
    assert kernel_path(nn.Linear(4, 4)) == "none"
    rep = kernel_report(nn.Sequential(on))
    assert rep["cpu_isa"] == fair_calib_ext.ops.get_cpu_isa() and rep["extension_error"] is None
