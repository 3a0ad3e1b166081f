"""GPTQ weight quantization (Frantar et al.), symmetric per output channel.

H = (2/n) Σ x xᵀ accumulated over the calibration tokens of the layer's input (after any online
transform). Dead inputs (H_jj = 0) get H_jj = 1 and a zero weight column; optional act-order
permutes columns by decreasing diag(H); damping H += damp · mean(diag H) · I; U = upper Cholesky
of H⁻¹; columns are quantized in blocks of ``blocksize`` with the error fed forward.
The per-row scale is fixed up front from the (clipped) original row, as in GPTQ without groups,
so the result is stored as integers + that scale.
"""

from __future__ import annotations

import torch

from .quantizer import compute_scale, qmax_for

__all__ = ["GPTQ"]


class GPTQ:
    """Hessian accumulator + solver for one linear with weight W [N, K]."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.k = in_features
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """x [..., K]: running update of H = (2/n) Σ x xᵀ."""
        x = x.reshape(-1, self.k).to(torch.float64)
        m = x.shape[0]
        self.h *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.h += x.T @ x

    @torch.no_grad()
    def quantize(self, w: torch.Tensor, bits: int = 4, clip: float | torch.Tensor = 1.0,
                 blocksize: int = 128, damp: float = 0.01,
                 act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """W [N, K] -> (q int8 [N, K], scale fp32 [N]) minimising ‖(W − Ŵ) X‖²."""
        if self.n == 0:
            raise RuntimeError("GPTQ.quantize called before any add_batch")
        wq = w.detach().to(torch.float64).clone()
        n_rows, k = wq.shape
        scale = compute_scale(w.detach().float(), bits, clip).to(torch.float64)  # [N, 1]
        qm = qmax_for(bits)
        h = self.h.clone()
        dead = torch.diag(h) == 0
        h[dead, dead] = 1.0
        wq[:, dead] = 0.0
        perm = None
        if act_order:
            perm = torch.argsort(torch.diag(h), descending=True)
            wq, h = wq[:, perm], h[perm][:, perm]
        h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype, device=h.device)
        hinv = torch.linalg.cholesky(h)
        hinv = torch.cholesky_inverse(hinv)
        u = torch.linalg.cholesky(hinv, upper=True)
        q_all = torch.zeros_like(wq)
        for i1 in range(0, k, blocksize):
            i2 = min(i1 + blocksize, k)
            w1 = wq[:, i1:i2].clone()
            err1 = torch.zeros_like(w1)
            u1 = u[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = w1[:, i]
                # the exact reference formula: fp32 division, round half even, clamp
                qcol = torch.clamp(torch.round(col.float().unsqueeze(1) / scale.float()), -qm - 1, qm)
                q_all[:, i1 + i] = qcol.squeeze(1).to(torch.float64)
                deq = qcol.squeeze(1).to(torch.float64) * scale.squeeze(1)
                e = (col - deq) / u1[i, i]
                w1[:, i:] -= e.unsqueeze(1) @ u1[i, i:].unsqueeze(0)
                err1[:, i] = e
            wq[:, i2:] -= err1 @ u[i1:i2, i2:]
        if perm is not None:
            inv = torch.argsort(perm)
            q_all = q_all[:, inv]
        return q_all.to(torch.int8), scale.squeeze(1).float()
