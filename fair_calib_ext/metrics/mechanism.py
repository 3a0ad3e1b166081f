"""Mechanism metrics of a (quantized) model against its full-precision teacher.

``mechanism_records`` runs two rollouts per prompt batch (``reference/fair_calib_method.md`` §6):

1. the teacher decodes (Trace) while the evaluated model is run on every teacher state
   (teacher-forced): frontier flips, post-commit mismatch (+ subsets), KL(teacher ‖ model) and
   probability MSE at committed positions, and the teacher's own stability lag;
2. the evaluated model decodes on its own while the teacher is run on every state: the model's
   stability lag, the step-wise probability MSE over masked positions and the first false
   commit (committed token ≠ teacher argmax on the same state).

When the evaluated model *is* the teacher, step 2 is skipped (its lag is the teacher's).
Records concatenate across batches and ranks (``merge_records``); ``summarize_mechanism``
reduces them to JSON-ready numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from .probe import rollout_with_probes
from .trajectory import (
    DivergenceRecords,
    FlipRecords,
    LagRecords,
    MismatchRecords,
    _Records,
    aligned_curve,
    cat_records,
    divergence_records,
    flip_records,
    lag_records,
    mismatch_records,
    summarize_divergence,
    summarize_flips,
    summarize_lag,
    summarize_mismatch,
)

__all__ = ["StepMseRecords", "MechanismRecords", "mechanism_records", "merge_records", "summarize_mechanism",
           "step_mse_records"]


@dataclass
class StepMseRecords(_Records):
    """Per rollout row: event [N] = first false-commit step (-1 none) and rows [N, T] = step-wise
    probability MSE over masked positions (NaN where nothing is masked)."""

    event: Tensor
    rows: Tensor


@dataclass
class MechanismRecords:
    """Everything needed to summarise one (teacher, model) pair; fields are None when absent."""

    flips: FlipRecords
    mismatch: MismatchRecords
    divergence: DivergenceRecords
    lag_teacher: LagRecords
    lag_model: LagRecords
    step_mse: StepMseRecords | None
    n_steps: int


def step_mse_records(commit: Tensor, tokens: Tensor, masked: Tensor, teacher_top1: Tensor, mse: Tensor) -> StepMseRecords:
    """Step-wise probability MSE over masked positions and the first false commit per row.

    Args: [T, B, G] tensors of the evaluated model's own rollout; ``teacher_top1`` and ``mse``
    come from running the teacher on the same states.
    """
    m = masked.double()
    n = m.sum(-1)  # [T, B]
    rows = torch.where(n > 0, (mse.double() * m).sum(-1) / n.clamp(min=1), torch.full_like(n, float("nan")))
    false = (commit & (tokens != teacher_top1)).any(-1)  # [T, B]
    first = torch.where(false.any(0), false.to(torch.int8).argmax(0), torch.full((false.shape[1],), -1))
    return StepMseRecords(event=first.long(), rows=rows.T.contiguous())


@torch.no_grad()
def mechanism_records(
    teacher: Any,
    model: Any,
    prompt_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    gen_kwargs: dict[str, Any],
) -> MechanismRecords:
    """Both rollouts for one batch of prompts (left-padded [B, P]); see the module docstring."""
    same = model is teacher
    a = rollout_with_probes(teacher, [] if same else [model], prompt_ids,
                            attention_mask=attention_mask, gen_kwargs=gen_kwargs)
    t_top1 = a.stats["top1"]
    if same:
        q_top1, kl, mse = t_top1, torch.zeros_like(a.stats["margin"]), torch.zeros_like(a.stats["margin"])
    else:
        comp = a.stats["companions"][0]
        q_top1, kl, mse = comp["top1"], comp["kl_roller_other"], comp["mse"]
    lag_t = lag_records(a.commit, a.tokens, t_top1)
    rec = MechanismRecords(
        flips=flip_records(a.commit, a.tokens, q_top1, a.stats["margin"]),
        mismatch=mismatch_records(a.commit, a.tokens, q_top1, t_top1),
        divergence=divergence_records(a.commit, kl, mse),
        lag_teacher=lag_t,
        lag_model=lag_t,
        step_mse=None,
        n_steps=int(a.commit.shape[0]),
    )
    if not same:
        b = rollout_with_probes(model, [teacher], prompt_ids, attention_mask=attention_mask, gen_kwargs=gen_kwargs)
        comp = b.stats["companions"][0]
        rec.lag_model = lag_records(b.commit, b.tokens, b.stats["top1"])
        rec.step_mse = step_mse_records(b.commit, b.tokens, b.masked, comp["top1"], comp["mse"])
    return rec


def merge_records(parts: Sequence[MechanismRecords]) -> MechanismRecords:
    """Concatenate records of several batches / ranks (same number of steps)."""
    if not parts:
        raise ValueError("merge_records needs at least one part")
    steps = {p.n_steps for p in parts}
    if len(steps) != 1:
        raise ValueError(f"parts have different step counts {sorted(steps)}")
    smse = [p.step_mse for p in parts if p.step_mse is not None]
    return MechanismRecords(
        flips=cat_records([p.flips for p in parts]),
        mismatch=cat_records([p.mismatch for p in parts]),
        divergence=cat_records([p.divergence for p in parts]),
        lag_teacher=cat_records([p.lag_teacher for p in parts]),
        lag_model=cat_records([p.lag_model for p in parts]),
        step_mse=cat_records(smse) if smse else None,
        n_steps=parts[0].n_steps,
    )


def summarize_mechanism(rec: MechanismRecords, align_window: int = 8) -> dict[str, Any]:
    """JSON-ready summary: flips, mismatch, divergence, lag (teacher and model), step MSE."""
    out: dict[str, Any] = {
        "n_steps": rec.n_steps,
        "flips": summarize_flips(rec.flips),
        "mismatch": summarize_mismatch(rec.mismatch),
        "divergence": summarize_divergence(rec.divergence),
        "lag_teacher": summarize_lag(rec.lag_teacher),
        "lag": summarize_lag(rec.lag_model),
    }
    if rec.step_mse is not None and len(rec.step_mse):
        rows = rec.step_mse.rows
        finite = ~torch.isnan(rows)
        out["step_mse"] = {
            "mean": float(rows[finite].mean()) if bool(finite.any()) else None,
            "by_step": [
                float(rows[:, t][finite[:, t]].mean()) if bool(finite[:, t].any()) else None
                for t in range(rows.shape[1])
            ],
            "frac_rows_with_false_commit": float((rec.step_mse.event >= 0).double().mean()),
            "aligned_to_first_false_commit": aligned_curve(rows, rec.step_mse.event, align_window, align_window),
        }
    return out
