"""Sampler settings from arguments and a checkpoint's generation_config.json, validated once.

``sample``, ``evaluate`` and the lm-eval adapter all resolve ``gen_length`` / ``steps`` /
``block_length`` / ``remasking`` and the fast-decoding ``cache`` / ``threshold`` here, so the same input is accepted or refused the same way
everywhere (never silently replaced by a default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from .generate import _ALIASES, CACHE_CHOICES, REMASKING

__all__ = ["CACHE_FLAG_CHOICES", "SamplerSettings", "check_fast_for_family", "resolve_sampler_settings"]

CACHE_FLAG_CHOICES = ("none", *(c for c in CACHE_CHOICES if c))  # --cache / cache= spellings; none: None


@dataclass(frozen=True)
class SamplerSettings:
    gen_length: int
    steps: int
    block_length: int | None  # None: one block (LLaDA schedule) or Dream's timestep schedule
    remasking: str | None  # None: the caller's family default
    cache: str | None = None  # Fast-dLLM KV cache: None, "prefix" or "dual"
    threshold: float | None = None  # Fast-dLLM confidence threshold in (0, 1], or None

    @property
    def fast(self) -> bool:
        """True when Fast-dLLM decoding is asked for (a cache or a threshold)."""
        return self.cache is not None or self.threshold is not None


def _parse_cache(cache: Any) -> str | None:
    if cache is None:
        return None
    c = str(cache).strip().lower()
    if c not in CACHE_FLAG_CHOICES:
        raise UsageError(f"--cache must be one of {', '.join(CACHE_FLAG_CHOICES)}, got {cache!r}")
    return None if c == "none" else c


def _parse_threshold(threshold: Any) -> float | None:
    if threshold is None or (isinstance(threshold, str) and threshold.strip().lower() in ("", "none")):
        return None
    bad = UsageError(f"--threshold must be a number in (0, 1], got {threshold!r}")
    if isinstance(threshold, bool):
        raise bad
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise bad from None
    if not math.isfinite(t) or not 0.0 < t <= 1.0:
        raise UsageError(f"--threshold must be in (0, 1], got {threshold!r}")
    return t


def check_fast_for_family(st: SamplerSettings, family: str, remasking: str | None = None) -> None:
    """The family-dependent rules of Fast-dLLM decoding (UsageError naming the flag): a Dream
    model needs ``--block-length`` (its block sampler) and ``entropy`` remasking; a LLaDA model
    ``low_confidence`` or ``random``. ``remasking``: the rule that will be used (default: the
    settings' own)."""
    if not st.fast:
        return
    rm = remasking if remasking is not None else st.remasking
    rm = _ALIASES.get(rm, rm) if rm is not None else None
    if family == "dream":
        if st.block_length is None:
            raise UsageError("--cache/--threshold on a Dream model need --block-length (Fast-dLLM's block sampler)")
        if rm is not None and rm != "entropy":
            raise UsageError(f"--cache/--threshold on a Dream model: --remasking must be entropy, got {rm!r}")
    elif rm is not None and rm not in ("low_confidence", "maskgit_plus", "random"):
        raise UsageError(f"--cache/--threshold on a LLaDA model: --remasking must be low_confidence or random, "
                         f"got {rm!r}")


def resolve_sampler_settings(
    *,
    gen_length: int | None,
    steps: int | None,
    block_length: int | None,
    remasking: str | None = None,
    generation_config: dict[str, Any] | None = None,
    default_gen_length: int = 32,
    cache: str | None = None,
    threshold: float | str | None = None,
    family: str | None = None,
) -> SamplerSettings:
    """Explicit arguments first, then generation_config.json, then defaults; then validation.

    The checkpoint's ``steps`` and ``block_length`` only go with its own generation length: when
    the caller sets ``gen_length``, they are not taken from the checkpoint. Raises
    :class:`UsageError` naming the CLI flag: lengths and steps must be >= 1, steps <= gen_length
    (at least one token is committed per step, so more steps cannot help and a huge value never
    returns), the block length must divide gen_length and the number of blocks must divide steps.
    ``cache`` is none/prefix/dual (None: none) and ``threshold`` None or in (0, 1]; with
    ``family`` the family rules of :func:`check_fast_for_family` are checked too.
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
    st = SamplerSettings(g, s, bl, rm, _parse_cache(cache), _parse_threshold(threshold))
    if family is not None:
        check_fast_for_family(st, family)
    return st
