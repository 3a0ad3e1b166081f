"""Masked-diffusion samplers (LLaDA block schedule, Dream timestep schedule) and Trace."""

from __future__ import annotations

from .generate import REMASKING, dream_timesteps, generate, generation_defaults, left_pad, num_transfer_tokens
from .trace import TRACE_FIELDS, Trace

__all__ = [
    "REMASKING",
    "TRACE_FIELDS",
    "Trace",
    "dream_timesteps",
    "generate",
    "generation_defaults",
    "left_pad",
    "num_transfer_tokens",
]
