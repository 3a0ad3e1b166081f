"""Mechanism metrics along diffusion trajectories: frontier flips, post-commit mismatch,
stability lag, KL / probability MSE (definitions: ``reference/fair_calib_method.md`` §6).

``trajectory`` holds pure functions of stacked Trace tensors; ``probe`` runs companion models on
every state of a rollout; ``mechanism`` puts both together for a (teacher, model) pair.
"""

from __future__ import annotations

from .mechanism import MechanismRecords, StepMseRecords, mechanism_records, merge_records, summarize_mechanism
from .probe import ProbeRun, StepRecorder, pair_stats, rollout_with_probes
from .trajectory import (
    DivergenceRecords,
    FlipRecords,
    LagRecords,
    MismatchRecords,
    aligned_curve,
    cat_records,
    ccdf,
    commit_steps,
    committed_tokens,
    divergence_records,
    flip_records,
    lag_records,
    mismatch_records,
    summarize_divergence,
    summarize_flips,
    summarize_lag,
    summarize_mismatch,
)

__all__ = [
    "DivergenceRecords",
    "FlipRecords",
    "LagRecords",
    "MechanismRecords",
    "MismatchRecords",
    "ProbeRun",
    "StepMseRecords",
    "StepRecorder",
    "aligned_curve",
    "cat_records",
    "ccdf",
    "commit_steps",
    "committed_tokens",
    "divergence_records",
    "flip_records",
    "lag_records",
    "mechanism_records",
    "merge_records",
    "mismatch_records",
    "pair_stats",
    "rollout_with_probes",
    "summarize_divergence",
    "summarize_flips",
    "summarize_lag",
    "summarize_mechanism",
    "summarize_mismatch",
]
