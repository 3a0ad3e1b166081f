"""Per-step comparison statistics and the own-rollout step-MSE records."""

from __future__ import annotations

import math

import pytest
import torch

from fair_calib_ext.metrics.mechanism import step_mse_records
from fair_calib_ext.metrics.probe import pair_stats


def test_pair_stats_hand_values():
    a = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    b = torch.log(torch.tensor([[[0.25, 0.5, 0.25]]]))
    st = pair_stats(a, b)
    assert st["a_top1"].item() == 0 and st["b_top1"].item() == 1
    assert st["a_margin"].item() == pytest.approx(0.25)
    kl = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    assert st["kl_ab"].item() == pytest.approx(kl, rel=1e-5)
    assert st["kl_ba"].item() == pytest.approx(0.25 * math.log(0.5) + 0.5 * math.log(2), rel=1e-5)
    assert st["mse"].item() == pytest.approx(2 * 0.25**2, rel=1e-5)


def test_pair_stats_identity_and_chunking():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 17)
    st = pair_stats(x, x, chunk=2)
    assert st["kl_ab"].abs().max() < 1e-6 and st["mse"].abs().max() < 1e-12
    y = x + 0.3 * torch.randn_like(x)
    s1, s2 = pair_stats(x, y, chunk=2), pair_stats(x, y, chunk=64)
    for k in s1:
        assert torch.allclose(s1[k].float(), s2[k].float())
    assert s1["kl_ab"].shape == (5, 3)


def test_step_mse_records_and_first_false_commit():
    T, B, G = 3, 2, 2
    masked = torch.tensor([[[1, 1], [1, 1]], [[0, 1], [1, 1]], [[0, 0], [0, 1]]], dtype=torch.bool)
    commit = torch.zeros(T, B, G, dtype=torch.bool)
    tokens = torch.zeros(T, B, G, dtype=torch.long)
    commit[0, 0, 0], tokens[0, 0, 0] = True, 4
    commit[1, 0, 1], tokens[1, 0, 1] = True, 5
    commit[1, 1, 0], tokens[1, 1, 0] = True, 6
    commit[2, 1, 1], tokens[2, 1, 1] = True, 7
    teacher_top1 = torch.full((T, B, G), 4)
    teacher_top1[1, 0, 1] = 9  # row 0: false commit at step 1 (5 != 9); step 0 agrees (4 == 4)
    teacher_top1[1, 1, 0] = 6  # row 1: step 1 agrees, step 2 commits 7 != 4 -> false at step 2
    mse = torch.arange(T * B * G, dtype=torch.float32).view(T, B, G)
    rec = step_mse_records(commit, tokens, masked, teacher_top1, mse)
    assert rec.event.tolist() == [1, 2]
    # row 0: step0 mean(0,1)=0.5, step1 only pos1 -> 5, step2 nothing masked -> NaN
    assert rec.rows[0, :2].tolist() == [0.5, 5.0] and math.isnan(rec.rows[0, 2].item())
    # row 1: step0 mean(2,3), step1 mean(6,7), step2 pos1 -> 11
    assert rec.rows[1].tolist() == [2.5, 6.5, 11.0]
