"""Calibration: Stage I position prior, the block-wise engine (all methods), packed checkpoints."""

from __future__ import annotations

from .checkpoint import load_quantized, save_quantized
from .data import CalibData, build_aligned_data, build_stream_data, position_weights
from .layerwise import calibrate, weighted_loss, weighted_mse
from .methods import MethodConfig, parse_method
from .prior import (
    DEFAULT_PRIOR,
    PRIOR_PRESETS,
    PositionPrior,
    PriorSpec,
    ProbeStats,
    finalize_prior,
    prior_spec,
    probe_prior,
    probe_stats,
)

__all__ = [
    "CalibData",
    "DEFAULT_PRIOR",
    "PRIOR_PRESETS",
    "PriorSpec",
    "ProbeStats",
    "build_aligned_data",
    "build_stream_data",
    "position_weights",
    "prior_spec",
    "probe_stats",
    "MethodConfig",
    "PositionPrior",
    "calibrate",
    "finalize_prior",
    "load_quantized",
    "parse_method",
    "probe_prior",
    "save_quantized",
    "weighted_loss",
    "weighted_mse",
]
