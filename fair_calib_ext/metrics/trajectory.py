"""Mechanism metrics as pure functions of stacked trajectory tensors.

Every function here takes tensors laid out ``[T, B, G]`` (step, batch row, generation position),
as returned by ``Trace.stacked(name)``, plus model top-1 tensors of the same shape, and returns
*records*: flat per-event tensors that concatenate across batches and ranks. ``summarize_*``
functions turn records into JSON-ready numbers. Definitions follow
``reference/fair_calib_method.md`` §6 (steps are 0-based here):

- a position i is committed at step t_c(i) (``commit[t_c, b, i]``) with token x̂_i;
- frontier flip: ``q_top1[t_c, b, i] != x̂_i`` (quantized model fed the teacher state S_{t_c});
- post-commit mismatch: ``q_top1[τ, b, i] != x̂_i`` for τ = t_c+1 .. T-1;
- stability lag: t_s = min{t ≥ t_c : top1[τ] == x̂ for all τ in [t, T-1]} (T if none, which
  is the censored value T - t_c), δ = t_s - t_c;
- positions committed at the last step have no post-commit steps and are excluded from the
  mismatch and lag records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_MARGIN_EDGES",
    "FlipRecords",
    "MismatchRecords",
    "LagRecords",
    "DivergenceRecords",
    "commit_steps",
    "committed_tokens",
    "flip_records",
    "mismatch_records",
    "lag_records",
    "divergence_records",
    "summarize_flips",
    "summarize_mismatch",
    "summarize_lag",
    "summarize_divergence",
    "ccdf",
    "aligned_curve",
    "cat_records",
]

#: teacher-margin (p1 - p2) bucket edges for the flip-rate breakdown
DEFAULT_MARGIN_EDGES: tuple[float, ...] = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)


def _check_tgb(name: str, x: Tensor, ref: Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(ref.shape)} [T, B, G]")


def commit_steps(commit: Tensor) -> Tensor:
    """Step at which each position was committed.

    Args:
        commit: BoolTensor [T, B, G].
    Returns:
        LongTensor [B, G]: the commit step, -1 for positions never committed.
    Raises:
        ValueError: if a position is committed more than once (committed tokens are final).
    """
    if commit.dim() != 3:
        raise ValueError(f"commit must be [T, B, G], got shape {tuple(commit.shape)}")
    counts = commit.sum(0)
    if bool((counts > 1).any()):
        raise ValueError("a position is committed more than once; commit must mark each position at most once")
    first = commit.to(torch.int8).argmax(0)
    return torch.where(counts > 0, first, torch.full_like(first, -1))


def committed_tokens(commit: Tensor, tokens: Tensor) -> Tensor:
    """Final committed token x̂ per position.

    Args:
        commit: BoolTensor [T, B, G]; tokens: LongTensor [T, B, G] (valid where commit).
    Returns:
        LongTensor [B, G]; -1 where a position was never committed.
    """
    _check_tgb("tokens", tokens, commit)
    tc = commit_steps(commit)
    x = tokens.gather(0, tc.clamp(min=0).unsqueeze(0)).squeeze(0)
    return torch.where(tc >= 0, x, torch.full_like(x, -1))


def _cat_field(values: list[Tensor]) -> Tensor:
    return torch.cat(values) if values else torch.empty(0)


@dataclass
class _Records:
    """Base: tensor fields of equal length N that concatenate across batches."""

    def to_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __len__(self) -> int:
        return int(getattr(self, fields(self)[0].name).numel())


@dataclass
class FlipRecords(_Records):
    """One entry per committed position: step [N] (0-based), n_steps [N] (T of its trajectory),
    margin [N] (teacher p1 - p2 at commit, NaN if unknown), flip [N] (bool) and position [N]
    (0-based index in the generation window, to set flips beside the position prior), row [N]
    (the prompt's row in its batch, for per-prompt counts and paired resampling)."""

    step: Tensor
    n_steps: Tensor
    margin: Tensor
    flip: Tensor
    position: Tensor
    row: Tensor


@dataclass
class MismatchRecords(_Records):
    """One entry per committed position with post-commit steps: n_post [N] = number of later
    steps, q_count [N] = steps where the evaluated model's top-1 differs from x̂, t_count [N] =
    the same for the teacher."""

    n_post: Tensor
    q_count: Tensor
    t_count: Tensor


@dataclass
class LagRecords(_Records):
    """One entry per committed position with post-commit steps: lag [N] and censored [N]."""

    lag: Tensor
    censored: Tensor


@dataclass
class DivergenceRecords(_Records):
    """One entry per committed position: step [N], n_steps [N], kl [N] (teacher ‖ evaluated
    model, nats) and mse [N] (Σ_v (p_q - p*)²), both read on the commit state S_{t_c}."""

    step: Tensor
    n_steps: Tensor
    kl: Tensor
    mse: Tensor


def cat_records(records: Sequence[_Records]) -> _Records:
    """Concatenate records of one type (across batches or ranks)."""
    if not records:
        raise ValueError("cat_records needs at least one record")
    cls = type(records[0])
    return cls(**{f.name: _cat_field([getattr(r, f.name) for r in records]) for f in fields(cls)})


def flip_records(commit: Tensor, tokens: Tensor, q_top1: Tensor, margin: Tensor | None = None) -> FlipRecords:
    """Frontier decision flips along a teacher trajectory.

    Args:
        commit: BoolTensor [T, B, G] from the teacher's trace.
        tokens: LongTensor [T, B, G], committed tokens (valid where commit).
        q_top1: LongTensor [T, B, G], evaluated model's top-1 on the teacher state S_t.
        margin: optional FloatTensor [T, B, G], teacher p1 - p2 on S_t.
    """
    _check_tgb("tokens", tokens, commit)
    _check_tgb("q_top1", q_top1, commit)
    commit_steps(commit)  # validates single commits
    T = commit.shape[0]
    steps = torch.arange(T).view(T, 1, 1).expand_as(commit)
    m = margin[commit].float() if margin is not None else torch.full((int(commit.sum()),), math.nan)
    if margin is not None:
        _check_tgb("margin", margin, commit)
    step = steps[commit]
    pos = torch.arange(commit.shape[2]).view(1, 1, -1).expand_as(commit)[commit]
    row = torch.arange(commit.shape[1]).view(1, -1, 1).expand_as(commit)[commit]
    return FlipRecords(
        step=step, n_steps=torch.full_like(step, T), margin=m, flip=(q_top1 != tokens)[commit], position=pos, row=row
    )


def _post_commit(commit: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(t_c [B,G], post mask [T,B,G] of steps τ > t_c, keep [B,G] positions with n_post > 0)."""
    T = commit.shape[0]
    tc = commit_steps(commit)
    steps = torch.arange(T).view(T, 1, 1)
    post = (steps > tc.unsqueeze(0)) & (tc >= 0).unsqueeze(0)
    keep = (tc >= 0) & (tc < T - 1)
    return tc, post, keep


def mismatch_records(commit: Tensor, tokens: Tensor, q_top1: Tensor, teacher_top1: Tensor) -> MismatchRecords:
    """Post-commit mismatch of the evaluated model and of the teacher itself.

    Args:
        commit, tokens: the teacher's trace [T, B, G].
        q_top1: evaluated model's top-1 on the teacher states [T, B, G].
        teacher_top1: the teacher's own top-1 on the same states [T, B, G].
    """
    _check_tgb("q_top1", q_top1, commit)
    _check_tgb("teacher_top1", teacher_top1, commit)
    x = committed_tokens(commit, tokens).unsqueeze(0)
    _, post, keep = _post_commit(commit)
    q = ((q_top1 != x) & post).sum(0)
    t = ((teacher_top1 != x) & post).sum(0)
    n = post.sum(0)
    return MismatchRecords(n_post=n[keep], q_count=q[keep], t_count=t[keep])


def lag_records(commit: Tensor, tokens: Tensor, top1: Tensor) -> LagRecords:
    """Stability lag of each committed position on a model's own trajectory.

    Args:
        commit, tokens: the trace of a rollout [T, B, G].
        top1: the same model's top-1 at every position and step of that rollout [T, B, G].
    """
    _check_tgb("top1", top1, commit)
    T = commit.shape[0]
    x = committed_tokens(commit, tokens)
    tc, _, keep = _post_commit(commit)
    agree = top1 == x.unsqueeze(0)
    trailing = agree.flip(0).to(torch.int64).cumprod(0).sum(0)  # length of the agreeing suffix
    first_stable = T - trailing
    t_s = torch.maximum(tc, first_stable)
    lag = t_s - tc
    return LagRecords(lag=lag[keep], censored=(first_stable == T)[keep])


def divergence_records(commit: Tensor, kl: Tensor, mse: Tensor) -> DivergenceRecords:
    """KL(teacher ‖ model) and probability MSE at each committed position, on its commit state.

    Args:
        commit: BoolTensor [T, B, G]; kl, mse: FloatTensor [T, B, G] for every position.
    """
    _check_tgb("kl", kl, commit)
    _check_tgb("mse", mse, commit)
    T = commit.shape[0]
    step = torch.arange(T).view(T, 1, 1).expand_as(commit)[commit]
    return DivergenceRecords(
        step=step, n_steps=torch.full_like(step, T), kl=kl[commit].float(), mse=mse[commit].float()
    )


def _decile(step: Tensor, n_steps: Tensor, n_bins: int = 10) -> Tensor:
    return torch.div(step * n_bins, n_steps, rounding_mode="floor").clamp(0, n_bins - 1)


def _rate(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


def summarize_flips(
    rec: FlipRecords, n_bins: int = 10, margin_edges: Sequence[float] = DEFAULT_MARGIN_EDGES
) -> dict[str, Any]:
    """Flip rate overall, per step decile and per teacher-margin bucket.

    Buckets are [edge_k, edge_{k+1}) except the last, which includes its upper edge.
    Rates are None where a bin has no commits.
    """
    n = len(rec)
    flips = rec.flip.to(torch.int64)
    dec = _decile(rec.step, rec.n_steps, n_bins)
    by_dec_n = torch.bincount(dec, minlength=n_bins) if n else torch.zeros(n_bins, dtype=torch.int64)
    by_dec_f = (
        torch.bincount(dec, weights=flips.double(), minlength=n_bins) if n else torch.zeros(n_bins)
    )
    buckets = []
    for k in range(len(margin_edges) - 1):
        lo, hi = margin_edges[k], margin_edges[k + 1]
        last = k == len(margin_edges) - 2
        sel = (rec.margin >= lo) & ((rec.margin <= hi) if last else (rec.margin < hi))
        buckets.append(
            {"lo": lo, "hi": hi, "n": int(sel.sum()), "rate": _rate(flips[sel].sum(), sel.sum())}
        )
    n_pos = int(rec.position.max()) + 1 if n else 0
    by_pos_n = torch.bincount(rec.position, minlength=n_pos) if n else torch.zeros(0, dtype=torch.int64)
    by_pos_f = torch.bincount(rec.position, weights=flips.double(), minlength=n_pos) if n else torch.zeros(0)
    return {
        "rate": _rate(flips.sum(), n),
        "n_commits": n,
        "n_flips": int(flips.sum()),
        "by_step_decile": [_rate(f, c) for f, c in zip(by_dec_f.tolist(), by_dec_n.tolist())],
        "commits_by_step_decile": by_dec_n.tolist(),
        "by_margin": buckets,
        "by_position": [_rate(f, c) for f, c in zip(by_pos_f.tolist(), by_pos_n.tolist())],
        "commits_by_position": by_pos_n.tolist(),
    }


def summarize_mismatch(rec: MismatchRecords) -> dict[str, Any]:
    """Post-commit mismatch rate overall and on the teacher-defined subsets (§6).

    mean-disagree: positions whose teacher disagreement averaged over post-commit steps > 0.5;
    never-agree: positions whose teacher top-1 never equals x̂ after the commit.
    Each rate is Σ mismatching (position, step) pairs / Σ pairs in the set.
    """
    n = rec.n_post.double()
    out: dict[str, Any] = {
        "rate": _rate(rec.q_count.sum(), n.sum()),
        "teacher_rate": _rate(rec.t_count.sum(), n.sum()),
        "n_positions": len(rec),
        "n_pairs": int(n.sum()),
    }
    frac_t = rec.t_count.double() / n.clamp(min=1)
    for name, sel in (("mean_disagree", frac_t > 0.5), ("never_agree", rec.t_count == rec.n_post)):
        out[name] = {
            "rate": _rate(rec.q_count[sel].sum(), n[sel].sum()),
            "n_positions": int(sel.sum()),
            "n_pairs": int(n[sel].sum()),
        }
    return out


def ccdf(values: Tensor) -> tuple[list[int], list[float]]:
    """Empirical survival function of non-negative integers: p[k] = P(value ≥ x[k]).

    x runs over 0 .. max(values) + 1, so the curve ends at 0.
    """
    v = values.to(torch.int64).flatten()
    if v.numel() == 0:
        return [], []
    if bool((v < 0).any()):
        raise ValueError("ccdf expects non-negative integers")
    counts = torch.bincount(v, minlength=int(v.max()) + 2).double()
    ge = counts.flip(0).cumsum(0).flip(0) / v.numel()
    return list(range(counts.numel())), ge.tolist()


def summarize_lag(rec: LagRecords) -> dict[str, Any]:
    """Median, p90, mean, share of lagging (δ > 0) and censored positions, and the CCDF."""
    if len(rec) == 0:
        return {"n_positions": 0, "median": None, "p90": None, "mean": None, "frac_positive": None,
                "frac_censored": None, "ccdf": {"x": [], "p": []}}
    lag = rec.lag.double()
    x, p = ccdf(rec.lag)
    return {
        "n_positions": len(rec),
        "median": float(torch.quantile(lag, 0.5)),
        "p90": float(torch.quantile(lag, 0.9)),
        "mean": float(lag.mean()),
        "frac_positive": float((rec.lag > 0).double().mean()),
        "frac_censored": float(rec.censored.double().mean()),
        "ccdf": {"x": x, "p": p},
    }


def summarize_divergence(rec: DivergenceRecords, n_bins: int = 10) -> dict[str, Any]:
    """Mean KL and probability MSE at committed positions, overall and per step decile."""
    n = len(rec)
    if n == 0:
        return {"n_commits": 0, "kl": None, "mse": None, "kl_by_step_decile": [None] * n_bins,
                "mse_by_step_decile": [None] * n_bins}
    dec = _decile(rec.step, rec.n_steps, n_bins)
    cnt = torch.bincount(dec, minlength=n_bins).double()
    out: dict[str, Any] = {"n_commits": n, "kl": float(rec.kl.double().mean()),
                           "mse": float(rec.mse.double().mean())}
    for name in ("kl", "mse"):
        s = torch.bincount(dec, weights=getattr(rec, name).double(), minlength=n_bins)
        out[f"{name}_by_step_decile"] = [_rate(a, c) for a, c in zip(s.tolist(), cnt.tolist())]
    return out


def aligned_curve(rows: Tensor, event: Tensor, before: int, after: int) -> dict[str, list]:
    """Average per-row step curves aligned to an event step (e.g. the first false commit).

    Args:
        rows: FloatTensor [B, T] (NaN = no value at that step).
        event: LongTensor [B], event step per row, -1 = no event (row ignored).
        before, after: offsets -before .. +after are reported.
    Returns:
        {"offset": [...], "mean": [...] (None where no row has a value), "n": [...]}.
    """
    if rows.dim() != 2 or event.shape != rows.shape[:1]:
        raise ValueError(f"rows must be [B, T] and event [B]; got {tuple(rows.shape)}, {tuple(event.shape)}")
    B, T = rows.shape
    offsets = torch.arange(-before, after + 1)
    idx = event.view(B, 1) + offsets.view(1, -1)
    ok = (event.view(B, 1) >= 0) & (idx >= 0) & (idx < T)
    vals = rows.double().gather(1, idx.clamp(0, max(T - 1, 0)))
    ok &= ~torch.isnan(vals)
    s = torch.where(ok, vals, torch.zeros_like(vals)).sum(0)
    n = ok.sum(0)
    return {
        "offset": offsets.tolist(),
        "mean": [_rate(a, c) for a, c in zip(s.tolist(), n.tolist())],
        "n": n.tolist(),
    }
