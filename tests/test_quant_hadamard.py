"""Hadamard constructions, the fast Walsh–Hadamard transform, and the real model dims."""

from __future__ import annotations

import math

import pytest
import torch

from fair_calib_ext.quant.hadamard import (
    _construct,
    fwht,
    hadamard_factor,
    hadamard_matrix,
    hadamard_transform,
    is_hadamard,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("m", [2, 4, 12, 20, 28, 36, 40, 44, 60, 108, 140, 148])
def test_constructed_factors_are_hadamard(m: int) -> None:
    h = _construct(m)
    assert h is not None and is_hadamard(h)


def test_fwht_matches_sylvester() -> None:
    n = 16
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ h)


@pytest.mark.parametrize("n,m", [(4096, 1), (12288, 12), (3584, 28), (18944, 148)])
def test_real_dims_factorisation(n: int, m: int) -> None:
    mm, p, exact = hadamard_factor(n)
    assert (mm, mm * p, exact) == (m, n, True)


@pytest.mark.parametrize("n", [96, 448, 592, 40, 10])  # 12·8, 28·16, 148·4, 40, fallback (5·2)
def test_transform_is_orthogonal(n: int) -> None:
    h = hadamard_matrix(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-10)
    if hadamard_factor(n)[2]:  # a true Hadamard: every entry ±1/sqrt(n)
        torch.testing.assert_close(h.abs(), torch.full_like(h, 1 / math.sqrt(n)))


@pytest.mark.parametrize("n", [4096, 12288, 3584, 18944])
def test_real_dims_preserve_norm_and_fold(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, generator=g, dtype=torch.float64)
    w = torch.randn(3, n, generator=g, dtype=torch.float64)
    hx = hadamard_transform(x, compute_dtype=torch.float64)
    hw = hadamard_transform(w, compute_dtype=torch.float64)
    torch.testing.assert_close(hx.norm(dim=-1), x.norm(dim=-1))
    # (x H)(W H)ᵀ = x Wᵀ: the online/fold pair QuaRot uses before down_proj
    torch.testing.assert_close(hx @ hw.T, x @ w.T)
