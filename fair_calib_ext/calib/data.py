"""Stage II calibration data: (prompt, continuation) samples with the prior aligned to each
continuation, and plain text windows with the prior on their trailing positions.

Stage I measures positions of a continuation *after a prompt* (position 0 = the first token the
sampler writes). The aligned layout puts prior position 0 on the first continuation token of
every sample, so the weight lands where the probe measured it:

    [ prompt_1 | answer_1 EOS … (fill to K) | prompt_2 | answer_2 EOS … | prompt_3 …   ]  ← seqlen
      outside    w[0] w[1] …    w[K-1]        outside    w[0] …

Several samples are packed per sequence (fully visible, no padding, as Stage II wants); the last
one is cut at ``seqlen`` and keeps its own alignment. Continuation positions past the prior
window get the floor; prompt positions get ``prior.outside`` (default: the floor).

A user with instruction data for LLaDA-8B / Dream-7B writes one JSON object per line,
``{"prompt": <chat-formatted prompt>, "answer": <response>}`` (any dataset with prompt/response
fields, e.g. the prompts of the target benchmark's train split and their reference answers),
and passes it as ``calibrate --calib-data file.jsonl``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

__all__ = ["CalibData", "build_aligned_data", "build_stream_data", "position_weights"]


@dataclass
class CalibData:
    """ids [n, S]; ``segments[r]`` = [(continuation start, continuation length), ...] of row r
    (empty lists for plain text windows, which use the trailing-K mapping)."""

    ids: torch.Tensor
    segments: list[list[tuple[int, int]]] = field(default_factory=list)

    @property
    def aligned(self) -> bool:
        return any(self.segments)


def build_stream_data(tokenizer: Any, texts: Sequence[str], nsamples: int, seqlen: int, seed: int,
                      eos_id: int | None) -> CalibData:
    """Token windows [nsamples, seqlen] at seeded offsets of the texts joined by EOS (WikiText-style)."""
    stream: list[int] = []
    for t in texts:
        stream.extend(tokenizer.encode(t, add_special_tokens=False))
        if eos_id is not None:
            stream.append(eos_id)
    if not stream:
        raise ValueError("calibration texts are empty")
    if len(stream) < seqlen + 1:
        stream = stream * ((seqlen + 1) // len(stream) + 1)  # short corpora are cycled
    ids = torch.tensor(stream, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return CalibData(torch.stack([ids[s:s + seqlen] for s in starts.tolist()]), [[] for _ in range(nsamples)])


def build_aligned_data(tokenizer: Any, pairs: Sequence[tuple[str, str]], nsamples: int, seqlen: int, seed: int,
                       eos_id: int | None, fill_to: int | None = None) -> CalibData:
    """Pack (prompt, answer) samples into [nsamples, seqlen] rows, recording where each
    continuation starts. The continuation is answer + EOS, filled with EOS up to ``fill_to``
    tokens when given (the layout the sampler produces for a generation of that length).
    Samples are drawn in a seeded order, cycling when more are needed."""
    if not pairs:
        raise ValueError("no (prompt, answer) pairs for aligned calibration data")
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"nsamples must be >= 1 and seqlen >= 2, got {nsamples}, {seqlen}")
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    enc_p = [tokenizer.encode(p, add_special_tokens=False) for p, _ in pairs]
    enc_a = [tokenizer.encode(a, add_special_tokens=False) for _, a in pairs]
    rows, segs = [], []
    k = 0
    for _ in range(nsamples):
        row: list[int] = []
        seg: list[tuple[int, int]] = []
        while len(row) < seqlen:
            j = order[k % len(order)]
            k += 1
            cont = list(enc_a[j]) + ([eos_id] if eos_id is not None else [])
            if fill_to is not None and eos_id is not None and len(cont) < fill_to:
                cont += [eos_id] * (fill_to - len(cont))
            start = len(row) + len(enc_p[j])
            row += list(enc_p[j]) + cont
            if start < seqlen:
                seg.append((start, min(len(cont), seqlen - start)))
        rows.append(row[:seqlen])
        segs.append(seg)
    return CalibData(torch.tensor(rows, dtype=torch.long), segs)


def position_weights(prior: Any, data: CalibData) -> torch.Tensor:
    """[n, S] Stage II weights: aligned rows get the prior from each continuation start,
    ``outside`` on prompts; plain rows get ``prior.to_positions(S)``. ``None`` prior → ones."""
    n, s = data.ids.shape
    if prior is None or getattr(prior, "mode", None) == "uniform":
        return torch.ones(n, s)
    w = prior.weights.float()
    k = w.numel()
    base = float(prior.floor if prior.outside is None else prior.outside)
    out = prior.to_positions(s).expand(n, s).clone()
    for r, seg in enumerate(data.segments or []):
        if not seg:
            continue
        out[r] = base
        for start, length in seg:
            m = min(length, k)
            out[r, start:start + m] = w[:m]
            if length > k:
                out[r, start + k:start + length] = float(prior.floor)
    return out
