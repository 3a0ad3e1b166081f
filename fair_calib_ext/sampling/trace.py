"""Per-step record of a masked-diffusion decode, over the generation region only."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["TRACE_FIELDS", "DecodeStats", "Trace"]

TRACE_FIELDS = ("canvas", "masked", "commit", "tokens", "top1", "prob", "entropy", "margin")


@dataclass
class Trace:
    """Filled by :func:`~fair_calib_ext.sampling.generate`, one entry per denoising step t.

    All entries are CPU tensors of shape [B, G] (G = gen_length; prompt positions are not
    recorded, which keeps memory at O(T·B·G) instead of O(T·B·(P+G)·V)):

    - ``canvas[t]`` (long): the generation region before step t (mask id where masked)
    - ``masked[t]`` (bool): positions masked before step t
    - ``commit[t]`` (bool): positions committed (unmasked) at step t
    - ``tokens[t]`` (long): the ids committed at step t (valid where ``commit[t]``)
    - ``top1[t]`` (long), ``prob[t]``, ``entropy[t]``, ``margin[t]`` (float32): the model's
      top-1 token at every generation position, its probability, the entropy (nats) and
      p1 − p2 of softmax(logits) in fp32 — the aligned (and CFG-mixed) logits the sampler
      used, before temperature, top-p or top-k. With a KV cache (``generate(cache=...)``) a
      step's forward covers a window of the sequence only: positions outside it get top1 = -1
      and NaN statistics.

    ``record_stats=False`` skips the four distribution statistics (they cost a softmax over
    the vocabulary per step). Attributes set by generate: ``prompt_len`` (P), ``gen_length``
    (G), ``steps`` (T, steps actually run), ``block_length``, ``schedule``, ``remasking``,
    ``mask_token_id``, ``nfe`` (model forward passes; one per step, a CFG pair counting as
    one), ``cache`` and ``threshold`` (the fast-decoding settings, None when off).
    """

    record_stats: bool = True
    canvas: list[torch.Tensor] = field(default_factory=list)
    masked: list[torch.Tensor] = field(default_factory=list)
    commit: list[torch.Tensor] = field(default_factory=list)
    tokens: list[torch.Tensor] = field(default_factory=list)
    top1: list[torch.Tensor] = field(default_factory=list)
    prob: list[torch.Tensor] = field(default_factory=list)
    entropy: list[torch.Tensor] = field(default_factory=list)
    margin: list[torch.Tensor] = field(default_factory=list)
    prompt_len: int = 0
    gen_length: int = 0
    steps: int = 0
    block_length: int | None = None
    schedule: str = ""
    remasking: str = ""
    mask_token_id: int = -1
    nfe: int = 0
    cache: str | None = None
    threshold: float | None = None

    def __len__(self) -> int:
        return len(self.canvas)

    def stacked(self, name: str) -> torch.Tensor:
        """Entries of one field stacked over steps: Tensor [T, B, G]."""
        if name not in TRACE_FIELDS:
            raise KeyError(f"unknown trace field {name!r}; fields: {TRACE_FIELDS}")
        items = getattr(self, name)
        if not items:
            raise ValueError(f"trace field {name!r} is empty (nothing recorded"
                             + (" — record_stats=False" if name in TRACE_FIELDS[4:] else "") + ")")
        return torch.stack(items)

    def commit_step(self) -> torch.Tensor:
        """[B, G] long: the step at which each position was committed (-1 if never)."""
        c = self.stacked("commit")
        step = torch.arange(c.shape[0]).view(-1, 1, 1).expand_as(c)
        out = torch.where(c, step, torch.full_like(step, c.shape[0])).min(0).values
        return torch.where(out == c.shape[0], torch.full_like(out, -1), out)

    def reset(self) -> None:
        """Drop all recorded steps (so one Trace object can be reused)."""
        for name in TRACE_FIELDS:
            getattr(self, name).clear()
        self.steps = 0
        self.nfe = 0


@dataclass
class DecodeStats:
    """What one :func:`~fair_calib_ext.sampling.generate` call cost (pass ``stats=DecodeStats()``).

    ``nfe``: model forward passes (a CFG pair counts as one; with several rows decoded one by
    one, the sum over rows). ``steps``: sampler steps (commit rounds); every step runs one
    forward, so the two are equal and stay apart only to name what is counted.
    """

    nfe: int = 0
    steps: int = 0
