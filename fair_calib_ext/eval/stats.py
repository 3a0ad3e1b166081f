"""Paired comparisons of two methods with bootstrap confidence intervals.

Both methods are run with the same seeds (same calibration samples and probe prompts per seed)
and scored on the same prompts, so the data are grids [seeds, prompts]. The bootstrap resamples
seeds and prompts (with replacement, the same draws for both methods: a paired, two-way
bootstrap) and recomputes the difference of the statistic; the CI is the percentile interval.
Resampling seeds carries the calibration variability, resampling prompts the evaluation noise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

__all__ = ["PairedDiff", "paired_diff_mean", "paired_diff_ratio"]

_Z_MDE = 2.80  # z_{0.975} + z_{0.80}: a true effect of this many SEs is found 80% of the time


@dataclass
class PairedDiff:
    """diff = stat(A) − stat(B); ``rel`` = stat(A)/stat(B) − 1 (ratios only) with its CI."""

    diff: float
    lo: float
    hi: float
    se: float
    mde: float  # minimal detectable effect (80% power, two-sided 5%)
    n_seeds: int
    n_prompts: int
    rel: float | None = None
    rel_lo: float | None = None
    rel_hi: float | None = None

    @property
    def significant(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def to_dict(self) -> dict[str, float | int | None | bool]:
        return {**asdict(self), "significant": self.significant}


def _grid(x: Sequence[Sequence[float]] | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty [seeds, prompts] grid, got shape {tuple(t.shape)}")
    return t


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the two methods were scored on different prompt sets ({a.shape[1]} vs {b.shape[1]})")
    s = max(a.shape[0], b.shape[0])
    for t, nm in ((a, "a"), (b, "b")):
        if t.shape[0] not in (1, s):
            raise ValueError(f"{nm} has {t.shape[0]} seeds, expected 1 or {s}")
    return a.expand(s, -1), b.expand(s, -1)  # a seed-independent method (FP, RTN) pairs with every seed


def _draws(s: int, p: int, n_boot: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, s, (n_boot, s), generator=g), torch.randint(0, p, (n_boot, p), generator=g)


def _resampled_sums(x: torch.Tensor, si: torch.Tensor, pi: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Σ over the resampled seeds × prompts of x, for every replicate [n_boot]."""
    out = []
    for i in range(0, si.shape[0], chunk):
        rows = x[si[i:i + chunk]]  # [c, S, P]
        cols = torch.gather(rows, 2, pi[i:i + chunk, None, :].expand(-1, rows.shape[1], -1))
        out.append(cols.sum((1, 2)))
    return torch.cat(out)


def _ci(v: torch.Tensor, level: float) -> tuple[float, float]:
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(v, q).tolist()
    return lo, hi


def paired_diff_mean(a, b, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> PairedDiff:
    """Mean of A − B over seeds × prompts (e.g. 0/1 correctness grids) with a paired bootstrap CI."""
    a, b = _pair(_grid(a, "a"), _grid(b, "b"))
    d = a - b
    s, p = d.shape
    si, pi = _draws(s, p, n_boot, seed)
    boot = _resampled_sums(d, si, pi) / (s * p)
    lo, hi = _ci(boot, level)
    se = float(boot.std())
    return PairedDiff(float(d.mean()), lo, hi, se, _Z_MDE * se, s, p)


def paired_diff_ratio(a_num, a_den, b_num, b_den, *, n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0) -> PairedDiff:
    """ΣA_num/ΣA_den − ΣB_num/ΣB_den (e.g. flips / commits per prompt) with a paired bootstrap
    CI, and the relative change (ratio − 1) with its CI."""
    an, ad = _pair(_grid(a_num, "a_num"), _grid(a_den, "a_den"))
    bn, bd = _pair(_grid(b_num, "b_num"), _grid(b_den, "b_den"))
    an, bn = _pair(an, bn)
    ad, bd = _pair(ad, bd)
    s, p = an.shape
    ra, rb = float(an.sum() / ad.sum()), float(bn.sum() / bd.sum())
    si, pi = _draws(s, p, n_boot, seed)
    ba = _resampled_sums(an, si, pi) / _resampled_sums(ad, si, pi).clamp(min=1e-12)
    bb = _resampled_sums(bn, si, pi) / _resampled_sums(bd, si, pi).clamp(min=1e-12)
    lo, hi = _ci(ba - bb, level)
    se = float((ba - bb).std())
    rel = ba / bb.clamp(min=1e-12) - 1
    rlo, rhi = _ci(rel, level)
    return PairedDiff(ra - rb, lo, hi, se, _Z_MDE * se, s, p, ra / rb - 1 if rb > 0 else None, rlo, rhi)
