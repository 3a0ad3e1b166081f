"""FlatQuant's learnable affine transforms for one decoder block (training form and folding).

Per linear, y = Q(x P) Q(P⁻¹ Wᵀ) with a Kronecker P = P₁ ⊗ P₂ and each factor
U diag(σ) Vᵀ (U, V orthogonal, parametrised as U₀·exp(S − Sᵀ); the inverse is V diag(1/σ) Uᵀ,
exact up to fp32 rounding). Transforms of one block:

  P_a  (q, k, v, after attn_norm)    online; diag(c_a) folded into attn_norm
  P_v  (per head, v_proj output)     folded into v_proj rows (and bias)
  P_o  (across heads, o_proj input)  online as P_o ⊗ I; o_proj gets (P_o ⊗ P_v)⁻ᵀ
  P_ug (up, gate, after mlp_norm)    online; diag(c_ug) folded into mlp_norm
  P_d  (down_proj input)             online; diag(c_d) folded into up_proj rows

plus learnable clipping: per output row for weights, one scalar per activation quantizer,
both σ(θ) with θ₀ = 4. ``FlatBlock.install`` swaps the block's linears for training-time
modules whose forward is exactly the folded form (so training sees deployment numerics);
``FlatBlock.fold`` returns :class:`PendingLinear` units (weights folded, not yet quantized).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from .modules import OnlineTransform, PendingLinear, kron_apply
from .quantizer import fake_quant

__all__ = ["kron_split", "OrthoDiag", "KronAffine", "FlatBlock", "smooth_init"]


def kron_split(n: int) -> tuple[int, int]:
    """n = n1 * n2 with n1 <= n2 minimising n1 + n2 (64x64 for 4096, 96x128 for 12288,
    56x64 for 3584, 128x148 for 18944)."""
    best = (1, n)
    for a in range(1, int(math.isqrt(n)) + 1):
        if n % a == 0:
            best = (a, n // a)
    return best


def _skew_exp(s: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_exp(s - s.transpose(0, 1))


class OrthoDiag(nn.Module):
    """One factor U diag(σ) Vᵀ; U = U₀·exp(S_u − S_uᵀ), V = exp(S_v − S_vᵀ), σ init 1.

    U₀ is a random orthogonal matrix (QR of a Gaussian, seeded), as in FlatQuant's init.
    """

    def __init__(self, n: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
        self.register_buffer("u0", (q * torch.sign(torch.diagonal(r))[None, :]).float())
        self.skew_u = nn.Parameter(torch.zeros(n, n))
        self.skew_v = nn.Parameter(torch.zeros(n, n))
        self.sigma = nn.Parameter(torch.ones(n))

    def _uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.u0 @ _skew_exp(self.skew_u), _skew_exp(self.skew_v)

    def matrix(self) -> torch.Tensor:
        u, v = self._uv()
        return (u * self.sigma[None, :]) @ v.transpose(0, 1)

    def inverse(self) -> torch.Tensor:
        u, v = self._uv()
        return (v / self.sigma[None, :]) @ u.transpose(0, 1)


class KronAffine(nn.Module):
    """P = P₁ ⊗ P₂ over n = n1 * n2 (a factor of size 1 is skipped)."""

    def __init__(self, n: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.n = n
        self.n1, self.n2 = kron_split(n)
        self.f1 = OrthoDiag(self.n1, generator) if self.n1 > 1 else None
        self.f2 = OrthoDiag(self.n2, generator)

    def mats(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        return (self.f1.matrix() if self.f1 is not None else None), self.f2.matrix()

    def inv_t(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(P₁⁻ᵀ, P₂⁻ᵀ): the weight-side factors."""
        a = self.f1.inverse().transpose(0, 1) if self.f1 is not None else None
        return a, self.f2.inverse().transpose(0, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.mats()
        if a is None:
            return x @ b
        return kron_apply(x, a, b)

    def apply_inv_t(self, w: torch.Tensor) -> torch.Tensor:
        a, b = self.inv_t()
        if a is None:
            return w @ b
        return kron_apply(w, a, b)

    def online(self) -> OnlineTransform:
        a, b = self.mats()
        if a is None:
            return OnlineTransform.kron(None, b, self.n)
        return OnlineTransform.kron(a, b, self.n)


def smooth_init(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant scale c_j = max|X_j|^α / max_rows|W_:,j|^(1−α) (clamped to [1e-5, 1e5])."""
    wmax = torch.cat([w.detach().float().abs().cpu() for w in weights], 0).amax(0).clamp(min=1e-5)
    c = act_absmax.float().cpu().clamp(min=1e-5).pow(alpha) / wmax.pow(1 - alpha)
    return c.clamp(1e-5, 1e5)  # on CPU like the other block parameters; FlatBlock.to() moves them


class _TrainLinear(nn.Module):
    """Training-time linear: fake-quant(T(x)) @ fake-quant(weight_side(W))ᵀ + b."""

    def __init__(self, lin: nn.Linear, block: "FlatBlock", role: str, name: str) -> None:
        super().__init__()
        self.register_buffer("weight", lin.weight.detach().float().clone())
        self.register_buffer("bias", lin.bias.detach().float().clone() if lin.bias is not None else None)
        n_out = self.weight.shape[0]
        self.w_clip_logit = (nn.Parameter(torch.full((n_out,), block.clip_init, device=self.weight.device))
                             if block.learn_clip else None)
        object.__setattr__(self, "_block", block)  # not a submodule: params live in the block
        self.role, self.name = role, name

    def w_clip(self) -> torch.Tensor | float:
        return torch.sigmoid(self.w_clip_logit) if self.w_clip_logit is not None else self._block.w_clip

    # weights at least this large recompute their folded, fake-quantized form in backward
    # instead of keeping its ~4 intermediates: same values and gradients (the ops are
    # deterministic), a full-width 8B block trains in ~4 fp32 copies of itself instead of ~10
    RECOMPUTE_NUMEL = 1 << 20

    def _folded_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        blk: FlatBlock = self._block
        w, b = blk.weight_side(self.role, self.name, self.weight, self.bias)
        return fake_quant(w, blk.w_bits, self.w_clip()), b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blk: FlatBlock = self._block
        xt = blk.act_side(self.role, x.float())
        xt = fake_quant(xt, blk.a_bits, blk.act_clip(self.role))
        if torch.is_grad_enabled() and self.weight.numel() >= self.RECOMPUTE_NUMEL:
            w, b = torch.utils.checkpoint.checkpoint(self._folded_weight, use_reentrant=False)
        else:
            w, b = self._folded_weight()
        return F.linear(xt, w, b).to(x.dtype)


class FlatBlock(nn.Module):
    """All learnable FlatQuant parameters of one decoder block."""

    ROLES = ("qkv", "o", "up_gate", "down")

    def __init__(self, layer: nn.Module, layer_map: dict[str, Any], *, num_heads: int,
                 num_kv_heads: int, head_dim: int, w_bits: int, a_bits: int,
                 act_stats: dict[str, torch.Tensor] | None, alpha: float = 0.3,
                 learn_clip: bool = True, clip_init: float = 4.0, w_clip: float = 1.0,
                 a_clip: float = 1.0, seed: int = 0, diag_scale: bool = True) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layer_map = layer_map
        self.nh, self.nkv, self.dh = num_heads, num_kv_heads, head_dim
        self.w_bits, self.a_bits = w_bits, a_bits
        self.learn_clip, self.clip_init, self.w_clip = learn_clip, clip_init, w_clip
        sub = layer.get_submodule
        d = sub(layer_map["qkv"][0]).in_features
        f = sub(layer_map["down"][0]).in_features
        self.p_qkv = KronAffine(d, g)
        self.p_ug = KronAffine(d, g)
        self.p_down = KronAffine(f, g)
        self.p_v = OrthoDiag(head_dim, g)
        self.p_o = OrthoDiag(num_heads, g) if num_heads > 1 else None
        # activation clips: one logit per quantizer (shared input = one quantizer)
        init = clip_init if learn_clip else 0.0
        self.a_logit = nn.ParameterDict({r: nn.Parameter(torch.tensor(float(init)), requires_grad=learn_clip)
                                         for r in self.ROLES})
        self.a_clip_fixed = a_clip
        # per-channel smoothing (diag(c)); ones when disabled or without statistics
        def _c(role: str, n: int) -> nn.Parameter:
            if diag_scale and act_stats is not None and role in act_stats:
                ws = [sub(nm).weight for nm in layer_map[role]]
                return nn.Parameter(smooth_init(act_stats[role], ws, alpha))
            return nn.Parameter(torch.ones(n), requires_grad=diag_scale)
        self.c = nn.ParameterDict({"qkv": _c("qkv", d), "up_gate": _c("up_gate", d), "down": _c("down", f)})
        self._installed: dict[str, nn.Module] = {}

    # -- the transform algebra (shared by the training forward and the fold) ---------------
    def act_clip(self, role: str) -> torch.Tensor | float:
        if self.learn_clip:
            return torch.sigmoid(self.a_logit[role])
        return self.a_clip_fixed

    def act_side(self, role: str, x: torch.Tensor) -> torch.Tensor:
        """What reaches the quantizer: x/c (folded into the norm later) then the online part."""
        if role == "qkv":
            return self.p_qkv.apply(x / self.c["qkv"])
        if role == "up_gate":
            return self.p_ug.apply(x / self.c["up_gate"])
        if role == "o":
            return kron_apply(x, self.p_o.matrix(), None) if self.p_o is not None else x
        return self.p_down.apply(x)  # down: 1/c_d already applied by up_proj's rows

    def weight_side(self, role: str, name: str, w: torch.Tensor,
                    b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Folded weight (and bias) for linear ``name`` in group ``role``."""
        lm = self.layer_map
        if role == "qkv":
            if name == lm["qkv"][2]:  # v_proj: per-head P_v on the output side
                pv = self.p_v.matrix()
                w = (pv.transpose(0, 1) @ w.view(self.nkv, self.dh, -1)).reshape(w.shape)
                if b is not None:
                    b = (b.view(self.nkv, self.dh) @ pv).reshape(-1)
            return self.p_qkv.apply_inv_t(w * self.c["qkv"]), b
        if role == "up_gate":
            if name == lm["up_gate"][0]:  # up_proj rows carry 1/c_d for down_proj
                w = w / self.c["down"][:, None]
            return self.p_ug.apply_inv_t(w * self.c["up_gate"]), b
        if role == "o":
            po_it = self.p_o.inverse().transpose(0, 1) if self.p_o is not None else None
            pv_it = self.p_v.inverse().transpose(0, 1)
            return kron_apply(w, po_it, pv_it), b
        return self.p_down.apply_inv_t(w * self.c["down"]), b

    def _online(self, role: str) -> OnlineTransform | None:
        if role == "qkv":
            return self.p_qkv.online()
        if role == "up_gate":
            return self.p_ug.online()
        if role == "o":
            n = self.nh * self.dh
            return OnlineTransform.kron(self.p_o.matrix(), None, n) if self.p_o is not None else None
        return self.p_down.online()

    # -- install / fold ---------------------------------------------------------------------
    def _roles(self) -> list[tuple[str, str]]:
        return [(r, nm) for r in self.ROLES for nm in self.layer_map[r]]

    def install(self, layer: nn.Module) -> None:
        """Replace the block's linears by training-time modules (originals kept for restore)."""
        for role, nm in self._roles():
            lin = layer.get_submodule(nm)
            self._installed[nm] = lin
            tl = _TrainLinear(lin, self, role, nm)
            self.add_module("w_" + nm.replace(".", "_"), tl)
            _set_module(layer, nm, tl)

    def trainable(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(transform + diag params, clipping params)."""
        clip, trans = [], []
        for n, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (clip if ("logit" in n) else trans).append(p)
        return trans, clip

    @torch.no_grad()
    def fold(self, layer: nn.Module) -> None:
        """Fold diag(c) into the norms, P⁻¹/clips into the weights; linears become PendingLinear."""
        norms = self.layer_map["norms"]
        for role, nm in self._roles():
            tl = layer.get_submodule(nm)
            w, b = self.weight_side(role, nm, tl.weight, tl.bias)
            clip = tl.w_clip()
            pl = PendingLinear(w, b, w_bits=self.w_bits, a_bits=self.a_bits,
                               w_clip=clip if isinstance(clip, float) else clip.detach(),
                               act_clip=float(self.act_clip(role)), transform=self._online(role))
            _set_module(layer, nm, pl)
        for role in ("qkv", "up_gate"):
            norm = layer.get_submodule(norms[role])
            norm.weight.data = (norm.weight.data.float() / self.c[role]).to(norm.weight.dtype)


def _set_module(root: nn.Module, name: str, mod: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, mod)
