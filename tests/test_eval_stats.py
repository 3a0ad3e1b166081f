"""Paired bootstrap: exact on degenerate cases, right width on a case with a known answer."""

import math

import pytest
import torch

from fair_calib_ext.eval.stats import paired_diff_mean, paired_diff_ratio


def test_constant_difference_has_a_zero_width_interval() -> None:
    g = torch.Generator().manual_seed(0)
    b = (torch.rand(5, 300, generator=g) < 0.5).double()
    a = b + 0.25
    r = paired_diff_mean(a, b, n_boot=500)
    assert r.diff == pytest.approx(0.25) and r.lo == pytest.approx(0.25) and r.hi == pytest.approx(0.25)
    assert r.significant and r.se == pytest.approx(0.0, abs=1e-12)


def test_interval_matches_the_normal_approximation_for_independent_prompts() -> None:
    # one seed, P prompts with d_i ∈ {−1, 0, 1} i.i.d.: the CI half-width must be ≈ 1.96 sd / sqrt(P)
    g = torch.Generator().manual_seed(1)
    p = 4000
    a = (torch.rand(1, p, generator=g) < 0.6).double()
    b = (torch.rand(1, p, generator=g) < 0.5).double()
    r = paired_diff_mean(a, b, n_boot=2000, seed=3)
    d = (a - b)[0]
    half = 1.96 * float(d.std()) / math.sqrt(p)
    assert r.diff == pytest.approx(float(d.mean()))
    assert (r.hi - r.lo) / 2 == pytest.approx(half, rel=0.1)
    assert r.mde == pytest.approx(2.8 * float(d.std()) / math.sqrt(p), rel=0.1)
    assert r.significant  # a true difference of 0.1 at this size


def test_pairing_removes_shared_prompt_difficulty() -> None:
    # both methods share a large per-prompt effect; the paired CI only sees the small difference
    g = torch.Generator().manual_seed(2)
    base = torch.randn(3, 500, generator=g) * 10
    a, b = base + 0.1 + 0.01 * torch.randn(3, 500, generator=g), base
    r = paired_diff_mean(a, b, n_boot=1000)
    assert r.lo > 0.09 and r.hi < 0.11


def test_seed_only_variation_is_resampled() -> None:
    # no prompt noise, the difference varies by seed only: the CI must not collapse to a point
    a = torch.tensor([[1.0] * 50, [0.0] * 50, [1.0] * 50, [0.0] * 50, [1.0] * 50])
    b = torch.full((5, 50), 0.5)
    r = paired_diff_mean(a, b, n_boot=2000)
    assert r.lo < 0 < r.hi and not r.significant


def test_ratio_of_sums_and_relative_change() -> None:
    fa, ca = torch.tensor([[1.0, 2.0, 0.0, 1.0]]), torch.full((1, 4), 10.0)
    fb, cb = torch.tensor([[2.0, 4.0, 0.0, 2.0]]), torch.full((1, 4), 10.0)
    r = paired_diff_ratio(fa, ca, fb, cb, n_boot=500)
    assert r.diff == pytest.approx(0.1 - 0.2)
    assert r.rel == pytest.approx(-0.5)
    # A is exactly half of B on every prompt, so every resample gives −50%
    assert r.rel_lo == pytest.approx(-0.5) and r.rel_hi == pytest.approx(-0.5)


def test_single_seed_method_pairs_with_every_seed_and_bad_shapes_refused() -> None:
    a = torch.ones(5, 10)
    b = torch.zeros(1, 10)
    assert paired_diff_mean(a, b, n_boot=100).diff == 1.0
    with pytest.raises(ValueError, match="different prompt sets"):
        paired_diff_mean(torch.ones(2, 10), torch.ones(2, 11))
    with pytest.raises(ValueError, match="seeds"):
        paired_diff_mean(torch.ones(2, 10), torch.ones(3, 10))
