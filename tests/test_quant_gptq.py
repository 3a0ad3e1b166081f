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
