"""Sampler settings from arguments and a checkpoint's generation_config.json, validated once.

``sample``, ``evaluate`` and the lm-eval adapter all resolve ``gen_length`` / ``steps`` /
``block_length`` / ``remasking`` here, so the same input is accepted or refused the same way
everywhere (never silently replaced by a default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from .generate import _ALIASES, REMASKING

__all__ = ["SamplerSettings", "resolve_sampler_settings"]


@dataclass(frozen=True)
class SamplerSettings:
    gen_length: int
    steps: int
    block_length: int | None  # None: one block (LLaDA schedule) or Dream's timestep schedule
    remasking: str | None  # None: the caller's family default


def resolve_sampler_settings(
    *,
    gen_length: int | None,
    steps: int | None,
    block_length: int | None,
    remasking: str | None = None,
    generation_config: dict[str, Any] | None = None,
    default_gen_length: int = 32,
) -> SamplerSettings:
    """Explicit arguments first, then generation_config.json, then defaults; then validation.

    The checkpoint's ``steps`` and ``block_length`` only go with its own generation length: when
    the caller sets ``gen_length``, they are not taken from the checkpoint. Raises
    :class:`UsageError` naming the CLI flag: lengths and steps must be >= 1, steps <= gen_length
    (at least one token is committed per step, so more steps cannot help and a huge value never
    returns), the block length must divide gen_length and the number of blocks must divide steps.
    """
    gc = generation_config or {}
    explicit_len = gen_length is not None
    g = gen_length if explicit_len else (gc.get("gen_length") or gc.get("max_new_tokens") or default_gen_length)
    s = steps if steps is not None else (gc.get("steps") if not explicit_len else None) or g
    bl = block_length if block_length is not None else (gc.get("block_length") if not explicit_len else None)
    g, s = int(g), int(s)
    if g < 1:
        raise UsageError(f"--gen-length must be >= 1, got {g}")
    if s < 1:
        raise UsageError(f"--steps must be >= 1, got {s}")
    if s > g:
        raise UsageError(f"--steps ({s}) must be <= --gen-length ({g}): every step commits at least one token")
    if bl is not None:
        bl = int(bl)
        if bl < 1 or g % bl:
            raise UsageError(f"--gen-length ({g}) must be divisible by --block-length ({bl})")
        if s % (g // bl):
            raise UsageError(f"--steps ({s}) must be divisible by the number of blocks ({g // bl})")
    rm = remasking if remasking is not None else (gc.get("remasking") or gc.get("alg"))
    if rm is not None and _ALIASES.get(rm, rm) not in REMASKING:
        raise UsageError(f"--remasking must be one of {REMASKING} (or 'topk_margin'), got {rm!r}")
    return SamplerSettings(g, s, bl, rm)
