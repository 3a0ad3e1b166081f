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
    """Hessian accumulator + solver for the linears that share one input (W [N, K] each).

    The Cholesky factor of H⁻¹ depends on H alone, so it is computed once (on the first
    :meth:`quantize`) and reused by every linear of the group; H itself is released then, so a
    K = 18944 input (Dream's down_proj) holds one K×K fp64 matrix at the peak, not five.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.k = in_features
        self.h: torch.Tensor | None = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0
        self._solved: tuple[float, bool, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """x [..., K]: running update of H = (2/n) Σ x xᵀ."""
        if self.h is None:
            raise RuntimeError("GPTQ.add_batch after quantize: the Hessian has been factorized and released")
        x = x.reshape(-1, self.k).to(torch.float64)
        m = x.shape[0]
        self.h *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.h += x.T @ x

    @torch.no_grad()
    def _solve(self, damp: float, act_order: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(dead input mask, column permutation or None, U = upper Cholesky of (H + damp)⁻¹)."""
        if self._solved is not None:
            d0, a0, dead, u, perm = self._solved
            if (d0, a0) != (damp, act_order):
                raise ValueError(f"GPTQ group solved with damp={d0}, act_order={a0}; got damp={damp}, "
                                 f"act_order={act_order}")
            return dead, perm, u
        h = self.h
        self.h = None
        dead = torch.diag(h) == 0
        h[dead, dead] = 1.0
        perm = None
        if act_order:
            perm = torch.argsort(torch.diag(h), descending=True)
            h = h[perm][:, perm]
        h.diagonal().add_(damp * torch.mean(torch.diag(h)))  # H + damp·mean(diag H)·I, without an eye
        # in place (h is ours): one K×K fp64 matrix at the peak, bit-identical to the copying calls
        torch.linalg.cholesky(h, out=h)
        torch.cholesky_inverse(h, out=h)
        u = torch.linalg.cholesky(h, upper=True, out=h)
        self._solved = (damp, act_order, dead, u, perm)
        return dead, perm, u

    @torch.no_grad()
    def quantize(self, w: torch.Tensor, bits: int = 4, clip: float | torch.Tensor = 1.0,
                 blocksize: int = 128, damp: float = 0.01,
                 act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """W [N, K] -> (q int8 [N, K], scale fp32 [N]) minimising ‖(W − Ŵ) X‖²."""
        if self.n == 0:
            raise RuntimeError("GPTQ.quantize called before any add_batch")
        dead, perm, u = self._solve(damp, act_order)
        wq = w.detach().to(torch.float64).clone()
        n_rows, k = wq.shape
        scale = compute_scale(w.detach().float(), bits, clip).to(torch.float64)  # [N, 1]
        scale32 = scale.float()
        qm = qmax_for(bits)
        wq[:, dead] = 0.0
        if perm is not None:
            wq = wq[:, perm]
        q_all = torch.zeros(wq.shape, dtype=torch.int8, device=wq.device)  # codes in [-8, 7]: exact
        for i1 in range(0, k, blocksize):
            i2 = min(i1 + blocksize, k)
            w1 = wq[:, i1:i2].clone()
            err1 = torch.zeros_like(w1)
            u1 = u[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = w1[:, i]
                # the exact reference formula: fp32 division, round half even, clamp
                qcol = torch.clamp(torch.round(col.float().unsqueeze(1) / scale32), -qm - 1, qm).squeeze(1)
                q_all[:, i1 + i] = qcol.to(torch.int8)
                deq = qcol.to(torch.float64) * scale.squeeze(1)
                e = (col - deq) / u1[i, i]
                w1[:, i:] -= e.unsqueeze(1) @ u1[i, i:].unsqueeze(0)
                err1[:, i] = e
            wq[:, i2:] -= err1 @ u[i1:i2, i2:]
        if perm is not None:
            q_all = q_all[:, torch.argsort(perm)]
        return q_all, scale.squeeze(1).float()
