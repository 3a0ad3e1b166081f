"""Calibration methods as (transform, weight quantizer) pairs behind one engine.

A method name is ``<transform>[+gptq]`` with transform in {rtn, smoothquant, quarot, gptq,
flatquant, fair}; "rtn" and "gptq" mean "no transform". Every transform is a pair of hooks the
engine (:mod:`fair_calib_ext.calib.layerwise`) calls:

- ``prepare_model(model)``: model-level, exactly output-preserving rewrites done once before
  the block loop (QuaRot: final-norm fusion + randomized Hadamard of embeddings and head);
- ``prepare_block(layer, model)``: the same rewrite for one block, applied when the engine
  builds it (a streamed model has no blocks in memory before that);
- ``transform_block(layer, ctx)``: turns the block's linears into :class:`PendingLinear`
  units (folded fp weights + online transform + clips), learning them if the method learns.

The engine then quantizes the pending weights with RTN or GPTQ and installs
:class:`QuantLinear` modules. No method contains a block loop of its own.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..quant.flatquant import FlatBlock, _set_module
from ..quant.hadamard import hadamard_matrix, hadamard_transform, random_hadamard_signs
from ..quant.modules import OnlineTransform, PendingLinear
from ..validate import check_float, check_int
from ..quant.quantizer import QuantConfig, search_weight_clip

__all__ = ["MethodConfig", "parse_method", "TRANSFORMS", "BlockContext", "get_transform", "METHOD_VERSION"]

METHOD_VERSION = 1
TRANSFORMS = ("rtn", "smoothquant", "quarot", "gptq", "flatquant", "fair")


# One rule per numeric field: (lo, hi) for ints, (lo, hi, lo exclusive) for floats (finite).
_INT_RULES: dict[str, tuple[int, int | None]] = {"seed": (0, 2**63 - 1), "gptq_block": (1, None),
                                                  "epochs": (0, None), "batch_size": (1, None)}
_FLOAT_RULES: dict[str, tuple[float, float | None, bool]] = {
    "sq_alpha": (0.0, 1.0, False), "quarot_act_clip": (0.0, 1.0, True), "gptq_damp": (0.0, None, True),
    "lr": (0.0, None, True), "clip_lr": (0.0, None, True), "weight_decay": (0.0, None, False),
    "lr_min_ratio": (0.0, 1.0, False), "flat_alpha": (0.0, 1.0, False), "clip_init": (-1e4, 1e4, False),
}


@dataclass
class MethodConfig:
    """Everything a calibration run needs besides the model and the data (serialisable)."""

    method: str = "fair"
    quant: QuantConfig = field(default_factory=QuantConfig)
    seed: int = 0
    fp_inputs: bool = False  # FlatQuant's convention: the student block sees FP inputs
    # smoothquant
    sq_alpha: float = 0.5
    # quarot
    quarot_act_clip: float = 0.9
    w_clip_search: bool | None = None  # default: on for quarot / gptq-only, off otherwise
    # gptq
    gptq_damp: float = 0.01
    gptq_block: int = 128
    gptq_act_order: bool = False
    # flatquant / fair
    epochs: int = 15
    batch_size: int = 4
    lr: float = 5e-3
    clip_lr: float = 5e-2
    weight_decay: float = 0.01
    lr_min_ratio: float = 1e-3
    flat_alpha: float = 0.3
    diag_scale: bool = True
    learn_clip: bool = True
    clip_init: float = 4.0
    version: int = METHOD_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.quant, dict):
            self.quant = QuantConfig.from_dict(self.quant)
        parse_method(self.method)
        # values that would crash deep inside a run (GPTQ's block loop), train on NaNs or never end
        for name, (lo, hi) in _INT_RULES.items():
            check_int(getattr(self, name), name, lo=lo, hi=hi)
        for name, (lo, hi, lo_open) in _FLOAT_RULES.items():
            check_float(getattr(self, name), name, lo=lo, hi=hi, lo_open=lo_open)
        for name in ("fp_inputs", "gptq_act_order", "diag_scale", "learn_clip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.w_clip_search is not None and not isinstance(self.w_clip_search, bool):
            raise ValueError(f"w_clip_search must be a bool or None, got {self.w_clip_search!r}")

    @property
    def transform(self) -> str:
        return parse_method(self.method)[0]

    @property
    def weight_quant(self) -> str:
        return parse_method(self.method)[1]

    @property
    def learns(self) -> bool:
        return self.transform in ("flatquant", "fair")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["quant"] = self.quant.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MethodConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def parse_method(name: str) -> tuple[str, str]:
    """'quarot+gptq' -> ('quarot', 'gptq'); 'gptq' -> ('gptq', 'gptq'); 'fair' -> ('fair', 'rtn')."""
    parts = name.lower().split("+")
    base = parts[0]
    if base not in TRANSFORMS or len(parts) > 2 or (len(parts) == 2 and parts[1] != "gptq"):
        raise ValueError(f"unknown method {name!r}; use one of {TRANSFORMS}, optionally with '+gptq'")
    wq = "gptq" if (base == "gptq" or len(parts) == 2) else "rtn"
    return base, wq


@dataclass
class BlockContext:
    """What a transform sees for block ``index`` (activations on CPU, [n, S, D])."""

    index: int
    x_student: torch.Tensor
    y_target: torch.Tensor
    pos_weights: torch.Tensor  # [n, S], row i weights sample i
    layer_kwargs: dict[str, Any]
    device: torch.device
    model_config: Any
    layer_map: dict[str, Any]
    run_batches: Callable[..., Any]
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    log: Callable[[dict[str, Any]], None]
    progress: bool = True
    stats: dict[str, Any] = field(default_factory=dict)


# -- helpers -------------------------------------------------------------------------------
def _linears(layer_map: dict[str, Any]) -> list[tuple[str, str]]:
    return [(role, nm) for role in ("qkv", "o", "up_gate", "down") for nm in layer_map[role]]


def _pending_plain(layer: nn.Module, cfg: MethodConfig, layer_map: dict[str, Any],
                   act_clip: float, w_clip_search: bool) -> None:
    """Replace every still-plain nn.Linear of the block by a PendingLinear (no transform)."""
    q = cfg.quant
    for _, nm in _linears(layer_map):
        lin = layer.get_submodule(nm)
        if isinstance(lin, PendingLinear):
            continue
        clip: float | torch.Tensor = q.w_clip
        if w_clip_search and q.w_bits < 16:
            clip = search_weight_clip(lin.weight, q.w_bits)
        _set_module(layer, nm, PendingLinear(lin.weight, lin.bias, w_bits=q.w_bits, a_bits=q.a_bits,
                                             w_clip=clip, act_clip=act_clip))


@torch.no_grad()
def collect_act_absmax(layer: nn.Module, ctx: BlockContext) -> dict[str, torch.Tensor]:
    """Per-channel max|x| of each group's input over the student calibration inputs."""
    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for role in ("qkv", "o", "up_gate", "down"):
        mod = layer.get_submodule(ctx.layer_map[role][0])

        def hook(_m: nn.Module, args: tuple[Any, ...], role: str = role) -> None:
            a = args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).amax(0).cpu()
            stats[role] = a if role not in stats else torch.maximum(stats[role], a)

        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        ctx.run_batches(layer, ctx.x_student)
    finally:
        for h in hooks:
            h.remove()
    return stats


# -- transforms ------------------------------------------------------------------------------
class Transform:
    """Base: no model-level rewrite, plain pending linears."""

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg

    def prepare_model(self, model: nn.Module) -> None:
        return None

    def prepare_block(self, layer: nn.Module, model: nn.Module) -> None:
        return None

    def transform_block(self, layer: nn.Module, ctx: BlockContext) -> None:
        search = self.cfg.w_clip_search if self.cfg.w_clip_search is not None else self.cfg.transform == "gptq"
        _pending_plain(layer, self.cfg, ctx.layer_map, self.cfg.quant.a_clip, search)


class SmoothQuantTransform(Transform):
    """s_j = max|X_j|^α / max|W_j|^(1−α); 1/s folded into the preceding norm / v_proj / up_proj."""

    @torch.no_grad()
    def transform_block(self, layer: nn.Module, ctx: BlockContext) -> None:
        lm, a = ctx.layer_map, self.cfg.sq_alpha
        stats = collect_act_absmax(layer, ctx)
        mc = ctx.model_config
        for role in ("qkv", "up_gate", "o", "down"):
            lins = [layer.get_submodule(nm) for nm in lm[role]]
            wmax = torch.cat([lin.weight.float().abs() for lin in lins], 0).amax(0).clamp(min=1e-5)
            act = stats[role].to(wmax.device)
            s = (act.clamp(min=1e-5).pow(a) / wmax.pow(1 - a)).clamp(1e-5, 1e5)
            if role == "o":
                # o_proj's input = per-head attention outputs of v: the scale must be tied across
                # the q heads sharing one kv head (GQA), then folded into v_proj's rows.
                nh, nkv, dh = mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
                s_kv = s.view(nkv, nh // nkv, dh).amax(1)  # [nkv, dh]
                s = s_kv.repeat_interleave(nh // nkv, 0).reshape(-1)
                v = layer.get_submodule(lm["qkv"][2])
                v.weight.data = (v.weight.float() / s_kv.reshape(-1, 1)).to(v.weight.dtype)
                if v.bias is not None:
                    v.bias.data = (v.bias.float() / s_kv.reshape(-1)).to(v.bias.dtype)
            elif role == "down":
                up = layer.get_submodule(lm["up_gate"][0])
                up.weight.data = (up.weight.float() / s[:, None]).to(up.weight.dtype)
            else:
                norm = layer.get_submodule(lm["norms"][role])
                norm.weight.data = (norm.weight.float() / s).to(norm.weight.dtype)
            for lin in lins:
                lin.weight.data = (lin.weight.float() * s[None, :]).to(lin.weight.dtype)
        super().transform_block(layer, ctx)


class QuaRotTransform(Transform):
    """Randomized Hadamard of the residual stream + online Hadamards (down_proj, o_proj heads)."""

    _ROWS = 4096  # rows rotated at a time: an 8B model's embedding never goes to fp64 whole

    def _rot_rows_(self, w: torch.Tensor) -> None:
        """w ← W Q in place, Q = diag(s) H, a chunk of rows at a time.

        fp32 weights are rotated in fp64; 16-bit ones (an 8B model's embeddings and head, as
        stored) in fp32, whose error (~1e-6 relative over a 4096-point transform) is far below
        the half-ulp the result is rounded to (2e-3 for bf16), at a third of the time.
        """
        signs = self.signs.to(w.device)
        cdt = torch.float64 if w.dtype in (torch.float32, torch.float64) else torch.float32
        for i in range(0, w.shape[0], self._ROWS):
            blk = w[i:i + self._ROWS]
            blk.copy_(hadamard_transform(blk.to(cdt) * signs.to(cdt), compute_dtype=cdt).to(w.dtype))

    @torch.no_grad()
    def prepare_model(self, model: nn.Module) -> None:
        d = model.config.hidden_size
        self.signs = random_hadamard_signs(d, torch.Generator().manual_seed(self.cfg.seed))
        if model.lm_head.weight is model.embed_tokens.weight:  # tied: the head gets its own copy
            model.lm_head.weight = nn.Parameter(model.embed_tokens.weight.detach().clone())
        head, norm = model.lm_head.weight.data, model.norm.weight.double()
        for i in range(0, head.shape[0], self._ROWS):
            blk = head[i:i + self._ROWS]
            blk.copy_((blk.double() * norm).to(head.dtype))
        model.norm.weight.data.fill_(1.0)
        self._rot_rows_(model.embed_tokens.weight.data)
        self._rot_rows_(head)

    @torch.no_grad()
    def prepare_block(self, layer: nn.Module, model: nn.Module) -> None:
        """Fuse the block's norms into the linears they feed, then rotate its residual-stream sides."""
        lm = model.layer_map()
        for role in ("qkv", "up_gate"):
            norm = layer.get_submodule(lm["norms"][role])
            for nm in lm[role]:
                lin = layer.get_submodule(nm)
                lin.weight.data = (lin.weight.double() * norm.weight.double()).to(lin.weight.dtype)
            norm.weight.data.fill_(1.0)
        for role in ("qkv", "up_gate"):
            for nm in lm[role]:
                self._rot_rows_(layer.get_submodule(nm).weight.data)
        for nm in lm["o"] + lm["down"]:  # output side: Qᵀ W
            lin = layer.get_submodule(nm)
            wt = lin.weight.data.T.contiguous()
            self._rot_rows_(wt)
            lin.weight.data = wt.T.contiguous()
            if lin.bias is not None:
                self._rot_rows_(lin.bias.data[None])

    @torch.no_grad()
    def transform_block(self, layer: nn.Module, ctx: BlockContext) -> None:
        lm, mc, q = ctx.layer_map, ctx.model_config, self.cfg.quant
        nh, nkv, dh = mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
        # head-wise Hadamard on v's output rows (I ⊗ H_dh), undone inside o_proj
        v = layer.get_submodule(lm["qkv"][2])
        hdh = hadamard_matrix(dh).to(v.weight.device)
        v.weight.data = (hdh.T @ v.weight.double().view(nkv, dh, -1)).reshape(v.weight.shape).to(v.weight.dtype)
        if v.bias is not None:
            v.bias.data = (v.bias.double().view(nkv, dh) @ hdh).reshape(-1).to(v.bias.dtype)
        # o_proj: online (H_nh ⊗ I), weight gets (H_nh ⊗ H_dh) (orthogonal: inverse-transpose = itself)
        o = layer.get_submodule(lm["o"][0])
        hnh = hadamard_matrix(nh).to(o.weight.device)
        from ..quant.modules import kron_apply

        o.weight.data = kron_apply(o.weight.double(), hnh, hdh).to(o.weight.dtype)
        online_o = OnlineTransform.kron(hnh, None, nh * dh) if nh > 1 else None
        # down_proj: online FWHT, folded into the weight's input side
        dn = layer.get_submodule(lm["down"][0])
        dn.weight.data = hadamard_transform(dn.weight.double(), compute_dtype=torch.float64).to(dn.weight.dtype)
        online_d = OnlineTransform("hadamard", dn.in_features)
        search = self.cfg.w_clip_search if self.cfg.w_clip_search is not None else True
        for nm, t in ((lm["o"][0], online_o), (lm["down"][0], online_d)):
            lin = layer.get_submodule(nm)
            clip = search_weight_clip(lin.weight, q.w_bits) if (search and q.w_bits < 16) else q.w_clip
            _set_module(layer, nm, PendingLinear(lin.weight, lin.bias, w_bits=q.w_bits, a_bits=q.a_bits,
                                                 w_clip=clip, act_clip=self.cfg.quarot_act_clip,
                                                 transform=t))
        _pending_plain(layer, self.cfg, lm, self.cfg.quarot_act_clip, search)


class FlatQuantTransform(Transform):
    """Learnable Kronecker affine transforms + diag scaling + learnable clipping, trained per block."""

    def transform_block(self, layer: nn.Module, ctx: BlockContext) -> None:
        cfg, mc = self.cfg, ctx.model_config
        stats = collect_act_absmax(layer, ctx) if cfg.diag_scale else None
        blk = FlatBlock(layer, ctx.layer_map, num_heads=mc.num_attention_heads,
                        num_kv_heads=mc.num_key_value_heads, head_dim=mc.head_dim,
                        w_bits=cfg.quant.w_bits, a_bits=cfg.quant.a_bits, act_stats=stats,
                        alpha=cfg.flat_alpha, learn_clip=cfg.learn_clip, clip_init=cfg.clip_init,
                        w_clip=cfg.quant.w_clip, a_clip=cfg.quant.a_clip,
                        seed=cfg.seed * 100_003 + ctx.index, diag_scale=cfg.diag_scale)
        blk.to(ctx.device)
        blk.install(layer)
        train_block(layer, blk, ctx, cfg)
        blk.fold(layer)
        blk.to("cpu")


def train_block(layer: nn.Module, blk: FlatBlock, ctx: BlockContext, cfg: MethodConfig) -> None:
    """AdamW (two lr groups) + cosine to lr·lr_min_ratio; loss / loss.detach() as FlatQuant."""
    trans, clip = blk.trainable()
    groups = [{"params": trans, "lr": cfg.lr}]
    if clip:
        groups.append({"params": clip, "lr": cfg.clip_lr})
    n = ctx.x_student.shape[0]
    bs = min(cfg.batch_size, n)
    steps_per_epoch = (n + bs - 1) // bs
    total = max(1, cfg.epochs * steps_per_epoch)
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    base = [g["lr"] for g in groups]
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + ctx.index)
    w = ctx.pos_weights.to(ctx.device)
    epoch_losses: list[float] = []
    it = range(cfg.epochs)
    if ctx.progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"block {ctx.index} epochs", leave=False)
    step = 0
    for ep in it:
        perm = torch.randperm(n, generator=gen)
        tot = 0.0
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            x = ctx.x_student[idx].to(ctx.device, torch.float32)
            y = ctx.y_target[idx].to(ctx.device, torch.float32)
            with torch.enable_grad():
                out = layer(x, **ctx.layer_kwargs)
                loss = ctx.loss_fn(out.float(), y, w[idx.to(w.device)] if w.dim() == 2 else w)
                opt.zero_grad(set_to_none=True)
                (loss / loss.detach().clamp(min=1e-30)).backward()
            opt.step()
            # cosine from lr to lr*ratio, per group (closed form, so resume-free and exact)
            step += 1
            for gi, g in enumerate(opt.param_groups):
                lo = base[gi] * cfg.lr_min_ratio
                g["lr"] = lo + 0.5 * (base[gi] - lo) * (1 + math.cos(math.pi * step / total))
            tot += float(loss.detach()) * len(idx)
        epoch_losses.append(tot / n)
        if ctx.progress and hasattr(it, "set_postfix"):
            it.set_postfix(loss=f"{epoch_losses[-1]:.4g}")
    ctx.stats["epoch_losses"] = epoch_losses


def get_transform(cfg: MethodConfig) -> Transform:
    """The transform object for ``cfg.method``."""
    t = cfg.transform
    if t in ("rtn", "gptq"):
        return Transform(cfg)
    if t == "smoothquant":
        return SmoothQuantTransform(cfg)
    if t == "quarot":
        return QuaRotTransform(cfg)
    return FlatQuantTransform(cfg)
