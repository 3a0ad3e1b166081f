"""GPTQ lowers the layer output error against RTN on a random layer."""

from __future__ import annotations

import pytest
import torch

from fair_calib_ext.quant.gptq import GPTQ
from fair_calib_ext.quant.quantizer import dequantize, quantize_ref


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn(act_order: bool) -> None:
    g = torch.Generator().manual_seed(0)
    k, n = 96, 40
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(512, k, generator=g) @ mix + 0.1 * torch.randn(512, k, generator=g)  # correlated inputs
    x[:, 5] *= 8  # an outlier channel
    w = torch.randn(n, k, generator=g)
    gp = GPTQ(k)
    for chunk in x.split(100):
        gp.add_batch(chunk)
    q, s = gp.quantize(w, 4, blocksize=32, act_order=act_order)
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
    qr, sr = quantize_ref(w, 4)
    assert torch.equal(s, sr)  # GPTQ keeps RTN's per-row scale; only the codes change
    ref = x @ w.T
    err_gptq = (x @ dequantize(q, s).T - ref).pow(2).mean()
    err_rtn = (x @ dequantize(qr, sr).T - ref).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn


def test_gptq_dead_inputs_and_errors() -> None:
    gp = GPTQ(8)
    with pytest.raises(RuntimeError):
        gp.quantize(torch.randn(4, 8))
    x = torch.randn(64, 8)
    x[:, 3] = 0.0  # a dead input channel: its weight column is zeroed
    gp.add_batch(x)
    q, _ = gp.quantize(torch.randn(4, 8), 4)
    assert bool((q[:, 3] == 0).all())


def _naive_obs(x: torch.Tensor, w: torch.Tensor, damp: float, act_order: bool) -> torch.Tensor:
    """GPTQ's result re-derived the slow way: one column at a time, each quantization error fed
    to every later column through H⁻¹ (the OBS update), and H⁻¹ updated by eliminating that
    column explicitly; no Cholesky, no blocks. Returns int8 codes [N, K] in the original order."""
    from fair_calib_ext.quant.quantizer import compute_scale

    xd = x.double()
    h = 2.0 * xd.T @ xd / xd.shape[0]
    k = h.shape[0]
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    h = h[perm][:, perm]
    h = h + damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    scale32 = compute_scale(w.float(), 4, 1.0).float()  # [N, 1], fixed up front as in GPTQ
    wk = w.double()[:, perm].clone()
    q = torch.zeros(wk.shape, dtype=torch.int8)
    for j in range(k):
        qc = torch.clamp(torch.round(wk[:, j].float().unsqueeze(1) / scale32), -8, 7).squeeze(1)
        q[:, j] = qc.to(torch.int8)
        err = (wk[:, j] - qc.double() * scale32.double().squeeze(1)) / hinv[j, j]
        wk[:, j + 1:] -= err.unsqueeze(1) * hinv[j, j + 1:].unsqueeze(0)
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]  # column j eliminated
    return q[:, torch.argsort(perm)]


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("blocksize", [1, 7, 32, 128])
def test_gptq_matches_a_naive_column_by_column_reference(act_order: bool, blocksize: int) -> None:
    """Every code equal to the naive OBS derivation, for block sizes that split K=48 unevenly,
    into single columns and into one block: fails if the error feedback inside or across blocks,
    the damping, or the act-order permutation goes wrong."""
    g = torch.Generator().manual_seed(3)
    k, n = 48, 24
    x = torch.randn(256, k, generator=g) @ (torch.randn(k, k, generator=g) / k**0.5)  # correlated
    x[:, 7] *= 6
    w = torch.randn(n, k, generator=g)
    gp = GPTQ(k)
    for chunk in x.split(64):
        gp.add_batch(chunk)
    q, _ = gp.quantize(w, 4, blocksize=blocksize, act_order=act_order, damp=0.01)
    ref = _naive_obs(x, w, 0.01, act_order)
    assert torch.equal(q, ref), f"{int((q != ref).sum())} of {q.numel()} codes differ"
