"""Quantizers and transforms shared by every method (reference int4 quantizer, fake-quant,
Hadamard / FWHT, GPTQ, FlatQuant transforms) and the deployed QuantLinear module."""

from __future__ import annotations

from .gptq import GPTQ
from .hadamard import fwht, hadamard_matrix, hadamard_transform
from .modules import (OnlineTransform, PendingLinear, QuantLinear, RefQuantLinear, kernel_path, kernel_report,
                      kernels_available)
from .quantizer import QuantConfig, dequantize, fake_quant, quantize_ref, round_ste

__all__ = [
    "GPTQ",
    "OnlineTransform",
    "PendingLinear",
    "QuantConfig",
    "QuantLinear",
    "RefQuantLinear",
    "dequantize",
    "fake_quant",
    "fwht",
    "hadamard_matrix",
    "hadamard_transform",
    "kernel_path",
    "kernel_report",
    "kernels_available",
    "quantize_ref",
    "round_ste",
]
