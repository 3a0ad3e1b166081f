"""Hadamard transforms for QuaRot: a fast Walsh–Hadamard transform plus small constructed factors.

A dimension n is split as n = m * 2^k where m is the smallest factor that is 1 or the order of a
constructible Hadamard matrix. The transform of x [..., n] is then x (H_m ⊗ H_{2^k}) / sqrt(n):
an O(n log n) butterfly over the 2^k part and an m x m matmul over the rest.

Factors are constructed, not stored as tables:
- Paley I  (q prime, q ≡ 3 mod 4): order q + 1       (12 = 11+1, 20 = 19+1, 44, ...)
- Paley II (q prime, q ≡ 1 mod 4): order 2 (q + 1)   (28 = 2·14, 36 = 2·18, 148 = 2·74, ...)
- Sylvester doubling of either.
The real model dims are covered: 4096 = 2^12; 12288 = 12·2^10; 3584 = 28·2^7; 18944 = 148·2^7
(Paley II with q = 73, the factor QuaRot's table lacks). If no construction exists for any
m·2^j dividing n, a seeded random orthogonal m x m matrix (QR of a Gaussian) replaces H_m; it is
still orthogonal, so every fold stays exact, but it is not ±1-valued (documented fallback).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

__all__ = [
    "fwht",
    "hadamard_matrix",
    "hadamard_factor",
    "hadamard_transform",
    "random_hadamard_signs",
    "is_hadamard",
]


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) over GF(q), chi the quadratic character (q prime)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 for prime q ≡ 3 (mod 4): H = I + S with S skew (conference-type)."""
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Order 2 (q + 1) for prime q ≡ 1 (mod 4): symmetric conference matrix C, then
    C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]."""
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(n, dtype=torch.float64), b)


def _construct(m: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order m (unnormalised, fp64) or None if we cannot build one."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    half = _construct(m // 2)
    if half is not None:
        return torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), half)
    return None


def is_hadamard(h: torch.Tensor) -> bool:
    """True when h is ±1-valued with h hᵀ = n I."""
    n = h.shape[0]
    return bool(((h.abs() - 1).abs() < 1e-9).all()) and bool(
        torch.allclose(h.double() @ h.double().T, n * torch.eye(n, dtype=torch.float64))
    )


@lru_cache(maxsize=None)
def hadamard_factor(n: int) -> tuple[int, int, bool]:
    """Split n = m * 2^k: returns (m, 2^k, is_true_hadamard).

    m is the smallest constructible order with n/m a power of two; if none, m = odd part of n
    times the largest power of two that keeps 2^k >= 1, and the m-factor is a random orthogonal.
    """
    if n < 1:
        raise ValueError(f"hadamard size must be positive, got {n}")
    k = (n & -n)  # largest power of two dividing n
    odd = n // k
    m = odd
    while m <= n:
        if _construct(m) is not None:
            return m, n // m, True
        m *= 2
    return odd, k, False


@lru_cache(maxsize=None)
def _factor_matrix(m: int, seed: int = 0) -> torch.Tensor:
    h = _construct(m)
    if h is not None:
        return h / math.sqrt(m)
    g = torch.Generator().manual_seed(1234 + seed + m)
    q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]  # orthogonal, deterministic


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform (Sylvester order) along the last dim (power of 2).

    x H with H the Sylvester matrix; O(n log n) butterflies, no matrix is formed.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two size, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, n)


def hadamard_transform(x: torch.Tensor, *, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x [..., n] -> x (H_m ⊗ H_{2^k}) / sqrt(n) in ``compute_dtype``, returned in x.dtype.

    Orthogonal (and symmetric when m's factor is), so applying it to the rows of a weight
    W gives the matching fold: (x H)(W H)ᵀ = x Wᵀ.
    """
    n = x.shape[-1]
    m, p, _ = hadamard_factor(n)
    xf = x.to(compute_dtype)
    y = fwht(xf.reshape(*x.shape[:-1], m, p)) / math.sqrt(p)  # [..., m, p]
    if m > 1:
        hm = _factor_matrix(m).to(device=x.device, dtype=compute_dtype)
        y = torch.einsum("im,...ip->...mp", hm, y)  # Hmᵀ Y: the left Kronecker factor
    return y.reshape(x.shape).to(x.dtype)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthogonal matrix of :func:`hadamard_transform` (rows = transformed unit vectors)."""
    return hadamard_transform(torch.eye(n, dtype=torch.float64), compute_dtype=torch.float64).to(dtype)


def random_hadamard_signs(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random ±1 diagonal [n] for QuaRot's randomized Hadamard Q = diag(s) H."""
    return torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1
