"""Masked-diffusion samplers (LLaDA block schedule, Dream timestep schedule, Fast-dLLM loops) and Trace."""

from __future__ import annotations

from .generate import REMASKING, dream_timesteps, generate, generation_defaults, left_pad, num_transfer_tokens
from .trace import TRACE_FIELDS, DecodeStats, Trace

__all__ = [
    "REMASKING",
    "TRACE_FIELDS",
    "DecodeStats",
    "Trace",
    "dream_timesteps",
    "generate",
    "generation_defaults",
    "left_pad",
    "num_transfer_tokens",
]
