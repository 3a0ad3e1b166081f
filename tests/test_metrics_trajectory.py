"""Mechanism metrics on hand-made trajectories with hand-computed answers."""

from __future__ import annotations

import math

import pytest
import torch

from fair_calib_ext.metrics.trajectory import (
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

# T = 4 steps, B = 1, G = 4 positions. Commits: pos0 @ t0, pos1 @ t1, pos3 @ t1, pos2 @ t3 (last).
X_HAT = [5, 6, 7, 4]
COMMIT_AT = {0: 0, 1: 1, 3: 1, 2: 3}
Q_TOP1 = [
    [5, 9, 7, 4],
    [8, 9, 7, 4],
    [5, 6, 7, 4],
    [8, 6, 1, 0],
]
T_TOP1 = [
    [5, 6, 0, 4],
    [5, 6, 0, 4],
    [3, 6, 0, 2],
    [3, 0, 7, 2],
]
MARGIN_AT_COMMIT = {0: 0.03, 1: 0.2, 3: 0.7, 2: 1.0}


def _trace():
    T, G = 4, 4
    commit = torch.zeros(T, 1, G, dtype=torch.bool)
    tokens = torch.zeros(T, 1, G, dtype=torch.long)
    margin = torch.full((T, 1, G), 0.9)
    for pos, t in COMMIT_AT.items():
        commit[t, 0, pos] = True
        tokens[t, 0, pos] = X_HAT[pos]
        margin[t, 0, pos] = MARGIN_AT_COMMIT[pos]
    q = torch.tensor(Q_TOP1).view(T, 1, G)
    tt = torch.tensor(T_TOP1).view(T, 1, G)
    return commit, tokens, margin, q, tt


def test_commit_steps_and_tokens():
    commit, tokens, *_ = _trace()
    assert commit_steps(commit).tolist() == [[0, 1, 3, 1]]
    assert committed_tokens(commit, tokens).tolist() == [X_HAT]
    partial = commit.clone()
    partial[3] = False
    assert commit_steps(partial).tolist() == [[0, 1, -1, 1]]
    assert committed_tokens(partial, tokens).tolist() == [[5, 6, -1, 4]]


def test_double_commit_is_rejected():
    commit, tokens, *_ = _trace()
    commit[2, 0, 0] = True
    with pytest.raises(ValueError, match="more than once"):
        commit_steps(commit)


def test_flips_overall_decile_margin():
    commit, tokens, margin, q, _ = _trace()
    s = summarize_flips(flip_records(commit, tokens, q, margin))
    # flips: pos1 (q 9 != 6 at t1) and pos2 (q 1 != 7 at t3); pos0, pos3 agree.
    assert s["n_commits"] == 4 and s["n_flips"] == 2 and s["rate"] == pytest.approx(0.5)
    # steps 0, 1, 1, 3 of T=4 -> deciles 0, 2, 2, 7
    dec = s["by_step_decile"]
    assert dec[0] == 0.0 and dec[2] == pytest.approx(0.5) and dec[7] == 1.0
    assert dec[1] is None and dec[9] is None
    assert s["commits_by_step_decile"][2] == 2
    buckets = {(b["lo"], b["hi"]): b for b in s["by_margin"]}
    assert buckets[(0.0, 0.05)]["rate"] == 0.0 and buckets[(0.0, 0.05)]["n"] == 1
    assert buckets[(0.05, 0.1)]["rate"] is None
    assert buckets[(0.1, 0.25)]["rate"] == 1.0
    # the last bucket includes its upper edge (margin 1.0 at pos2)
    assert buckets[(0.5, 1.0)]["n"] == 2 and buckets[(0.5, 1.0)]["rate"] == pytest.approx(0.5)
    # one commit per generation position; positions 1 and 2 flipped
    assert s["commits_by_position"] == [1, 1, 1, 1]
    assert s["by_position"] == [0.0, 1.0, 1.0, 0.0]


def test_flips_without_margin():
    commit, tokens, _, q, _ = _trace()
    rec = flip_records(commit, tokens, q)
    assert torch.isnan(rec.margin).all()
    assert summarize_flips(rec)["rate"] == pytest.approx(0.5)


def test_mismatch_and_subsets():
    commit, tokens, _, q, tt = _trace()
    rec = mismatch_records(commit, tokens, q, tt)
    # pos0: post steps t1..t3 (3), q mismatches t1,t3 (2), teacher t2,t3 (2)
    # pos1: t2..t3 (2), q 0, teacher 1 (t3);  pos3: t2..t3 (2), q 1 (t3), teacher 2
    # pos2 is committed at the last step -> excluded
    assert rec.n_post.tolist() == [3, 2, 2]
    assert rec.q_count.tolist() == [2, 0, 1]
    assert rec.t_count.tolist() == [2, 1, 2]
    s = summarize_mismatch(rec)
    assert s["rate"] == pytest.approx(3 / 7)
    assert s["teacher_rate"] == pytest.approx(5 / 7)
    # mean-disagree: teacher fraction > 0.5 -> pos0 (2/3) and pos3 (1); pos1 is exactly 0.5
    assert s["mean_disagree"]["n_positions"] == 2
    assert s["mean_disagree"]["rate"] == pytest.approx(3 / 5)
    # never-agree: pos3 only
    assert s["never_agree"]["n_positions"] == 1
    assert s["never_agree"]["rate"] == pytest.approx(1 / 2)


def test_teacher_against_itself_has_no_flips_and_own_mismatch():
    commit, tokens, _, _, tt = _trace()
    tt = tt.clone()
    tt[0, 0, 0], tt[1, 0, 1], tt[1, 0, 3], tt[3, 0, 2] = 5, 6, 4, 7  # argmax commits
    assert summarize_flips(flip_records(commit, tokens, tt))["rate"] == 0.0
    s = summarize_mismatch(mismatch_records(commit, tokens, tt, tt))
    assert s["rate"] == s["teacher_rate"]


def test_stability_lag_and_ccdf():
    commit, tokens, _, q, _ = _trace()
    rec = lag_records(commit, tokens, q)
    # pos0 [5,8,5,8] never stable -> censored at T - t_c = 4; pos1 [9,9,6,6] stable from t2 -> 1;
    # pos3 [4,4,4,0] never stable -> censored 3; pos2 (last-step commit) excluded
    assert rec.lag.tolist() == [4, 1, 3]
    assert rec.censored.tolist() == [True, False, True]
    x, p = ccdf(rec.lag)
    assert x == [0, 1, 2, 3, 4, 5]
    assert p == pytest.approx([1, 1, 2 / 3, 2 / 3, 1 / 3, 0])
    s = summarize_lag(rec)
    assert s["median"] == 3.0 and s["frac_censored"] == pytest.approx(2 / 3)
    assert s["p90"] == pytest.approx(3.8)  # linear interpolation over [1, 3, 4]


def test_stability_lag_simple_cases():
    T = 4
    commit = torch.zeros(T, 1, 3, dtype=torch.bool)
    commit[0, 0, :] = True
    tokens = torch.full((T, 1, 3), 1)
    top1 = torch.tensor([[1, 1, 2], [1, 2, 2], [1, 1, 1], [1, 1, 1]]).view(T, 1, 3)
    rec = lag_records(commit, tokens, top1)
    # always equal -> 0; flips back at t2 -> 2; equal only from t2 -> 2
    assert rec.lag.tolist() == [0, 2, 2]
    assert not rec.censored.any()


def test_divergence_at_commits():
    commit, *_ = _trace()
    kl = torch.arange(16, dtype=torch.float32).view(4, 1, 4)
    mse = kl / 10
    s = summarize_divergence(divergence_records(commit, kl, mse))
    # committed cells: (t0,p0)=0, (t1,p1)=5, (t1,p3)=7, (t3,p2)=14
    assert s["kl"] == pytest.approx((0 + 5 + 7 + 14) / 4)
    assert s["mse"] == pytest.approx((0 + 5 + 7 + 14) / 40)
    assert s["kl_by_step_decile"][2] == pytest.approx(6.0)


def test_records_concatenate():
    commit, tokens, margin, q, tt = _trace()
    a = mismatch_records(commit, tokens, q, tt)
    both = cat_records([a, a])
    assert len(both) == 6
    assert summarize_mismatch(both)["rate"] == pytest.approx(3 / 7)


def test_aligned_curve():
    rows = torch.tensor([[1.0, 2, 3, 4], [10, 20, 30, 40], [7, 7, 7, 7]])
    out = aligned_curve(rows, torch.tensor([1, 3, -1]), before=1, after=2)
    assert out["offset"] == [-1, 0, 1, 2]
    assert out["mean"] == pytest.approx([15.5, 21.0, 3.0, 4.0])
    assert out["n"] == [2, 2, 1, 1]
    rows[0, 2] = math.nan
    assert aligned_curve(rows, torch.tensor([1, -1, -1]), 0, 1)["mean"] == [2.0, None]


def test_shape_errors_name_the_argument():
    commit, tokens, _, q, _ = _trace()
    with pytest.raises(ValueError, match="q_top1"):
        flip_records(commit, tokens, q[:, :, :2])
