"""Calibration: Stage I position prior, the block-wise engine (all methods), packed checkpoints."""

from __future__ import annotations

from .checkpoint import load_quantized, save_quantized
from .layerwise import calibrate, weighted_loss, weighted_mse
from .methods import MethodConfig, parse_method
from .prior import PositionPrior, accumulate_trace, finalize_prior, probe_prior

__all__ = [
    "MethodConfig",
    "PositionPrior",
    "accumulate_trace",
    "calibrate",
    "finalize_prior",
    "load_quantized",
    "parse_method",
    "probe_prior",
    "save_quantized",
    "weighted_loss",
    "weighted_mse",
]
