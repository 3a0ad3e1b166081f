"""Stage I of FAIR-Calib: the position prior from full-precision random-commit rollouts.

For every rollout, step t (1-based, t = 1..T) and generation position i (reference §3):

    F_i += λ0(t) · 1[i committed at t]                       frontier-hit term
    R_i += c_{t,i} / mean_{j masked}(c_{t,j}) · 1[i masked at t]   masked-stage reliability term

then  w = F/mean(F) + λ1 · R/mean(R);  w = w / mean(w);  w = max(w, floor)   ("both"),
with "frontier" (R off), "masked" (F off) and "uniform" (w ≡ 1 everywhere) as ablations.
Reliability c: top-1 probability ("prob", default), 1 − H/log V ("neg_entropy"), p1 − p2
("margin"). λ0 schedules: early = (T − t + 1)/T (default), flat = 1, late = t/T,
exp = exp(−3 (t − 1)/T) (our choice of rate). The probe policy is the sampler with
``remasking="random"`` and block length 32 (1 commit per step, argmax tokens).

A property of these defaults worth knowing: with one commit per step (T = K), λ0 early and a
constant c̃, every position gets exactly the same "both" weight, whatever the commit order — a
position committed at step t_c collects F = (T − t_c + 1)/T and R = t_c, and after the per-term
mean normalisation F/mean F + R/mean R = 2 (T − t_c + 1)/(T + 1) + 2 t_c/(T + 1) = 2. The shape
of the default prior therefore comes only from how c̃ varies across positions; the frontier-only
and masked-only ablations keep the commit-time structure.

Mapping onto a calibration sequence of length N: position n ≥ N − K gets w[n − (N − K)], the
earlier positions get the floor (``uniform``: ones everywhere).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["PositionPrior", "accumulate_trace", "finalize_prior", "probe_prior", "lambda0",
           "PRIOR_MODES", "LAMBDA0_SCHEDULES", "RELIABILITY"]

PRIOR_MODES = ("both", "frontier", "masked", "uniform")
LAMBDA0_SCHEDULES = ("early", "flat", "late", "exp")
RELIABILITY = ("prob", "neg_entropy", "margin")


def lambda0(t: int, steps: int, schedule: str = "early") -> float:
    """λ0(t) for the global step t in 1..T."""
    if schedule == "early":
        return (steps - t + 1) / steps
    if schedule in ("flat", "const"):
        return 1.0
    if schedule == "late":
        return t / steps
    if schedule == "exp":
        return math.exp(-3.0 * (t - 1) / steps)
    raise ValueError(f"unknown lambda0 schedule {schedule!r}; choose from {LAMBDA0_SCHEDULES}")


@dataclass
class PositionPrior:
    """Weights w [K] over the trailing K positions of a sequence, plus how they were made."""

    weights: torch.Tensor
    floor: float = 0.1
    mode: str = "both"
    settings: dict[str, Any] = field(default_factory=dict)
    outside: float | None = None  # weight before the window; None: the floor (reference default)

    @property
    def window(self) -> int:
        return int(self.weights.numel())

    def to_positions(self, seqlen: int) -> torch.Tensor:
        """[seqlen] weights: the prior on the trailing K positions, ``outside`` (default: the
        floor) before them."""
        if self.mode == "uniform":
            return torch.ones(seqlen)
        k = self.window
        out = torch.full((seqlen,), float(self.floor if self.outside is None else self.outside))
        if seqlen >= k:
            out[seqlen - k:] = self.weights.float()
        else:
            out[:] = self.weights.float()[k - seqlen:]
        return out

    @classmethod
    def uniform(cls, window: int = 1) -> "PositionPrior":
        return cls(torch.ones(window), floor=1.0, mode="uniform", settings={"prior": "uniform"})

    def save(self, path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``<path>.safetensors`` (the weights) and ``<path>.json`` (the settings)."""
        from safetensors.torch import save_file

        base = Path(path)
        if base.suffix in (".safetensors", ".json"):
            base = base.with_suffix("")
        base.parent.mkdir(parents=True, exist_ok=True)
        st, js = base.with_suffix(".safetensors"), base.with_suffix(".json")
        tmp = st.with_name(st.name + ".tmp")
        save_file({"weights": self.weights.float().contiguous()}, str(tmp))
        os.replace(tmp, st)
        meta = {"floor": self.floor, "mode": self.mode, "window": self.window, "settings": self.settings,
                "outside": self.outside}
        tmpj = js.with_name(js.name + ".tmp")
        tmpj.write_text(json.dumps(meta, indent=1))
        os.replace(tmpj, js)
        return st, js

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "PositionPrior":
        from safetensors.torch import load_file

        base = Path(path)
        if base.suffix in (".safetensors", ".json"):
            base = base.with_suffix("")
        st, js = base.with_suffix(".safetensors"), base.with_suffix(".json")
        if not st.is_file() or not js.is_file():
            raise FileNotFoundError(f"prior {base}: need both {st.name} and {js.name}")
        meta = json.loads(js.read_text())
        return cls(load_file(str(st))["weights"], floor=meta["floor"], mode=meta["mode"],
                   settings=meta.get("settings", {}), outside=meta.get("outside"))

    def plot(self, path: str | os.PathLike[str]) -> None:
        """PNG of the prior over the window."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(self.weights.numpy())
        ax.axhline(self.floor, ls="--", c="gray", lw=0.8)
        ax.set_xlabel("generation position")
        ax.set_ylabel("w̄")
        ax.set_title(f"FAIR-Calib position prior ({self.mode})")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _reliability(kind: str, prob: torch.Tensor, entropy: torch.Tensor, margin: torch.Tensor,
                 vocab_size: int) -> torch.Tensor:
    if kind == "prob":
        return prob
    if kind == "neg_entropy":
        return 1.0 - entropy / math.log(vocab_size)
    if kind == "margin":
        return margin
    raise ValueError(f"unknown reliability {kind!r}; choose from {RELIABILITY}")


def accumulate_trace(trace: Any, f_acc: torch.Tensor, r_acc: torch.Tensor, *, lambda0_schedule: str = "early",
                     reliability: str = "prob", vocab_size: int | None = None,
                     step_offset: int = 0, total_steps: int | None = None) -> None:
    """Add one batch of rollouts (a filled Trace) into F [G] and R [G] in place.

    ``trace.masked[t]``, ``commit[t]`` and the statistics are [B, G]. c̃ = c / mean(c over the
    row's masked positions) (rows with no masked position add nothing).
    """
    steps = total_steps or len(trace.masked)
    vocab = vocab_size or 2
    for t in range(len(trace.masked)):
        gstep = t + 1 + step_offset
        m = trace.masked[t].bool()
        c = trace.commit[t].bool()
        f_acc += lambda0(gstep, steps, lambda0_schedule) * c.float().sum(0)
        rel = _reliability(reliability, trace.prob[t].float(), trace.entropy[t].float(),
                           trace.margin[t].float(), vocab)
        mf = m.float()
        cnt = mf.sum(1, keepdim=True)
        mean = (rel * mf).sum(1, keepdim=True) / cnt.clamp(min=1)
        ok = (cnt > 0) & (mean.abs() > 0)
        tilde = torch.where(ok, rel / torch.where(ok, mean, torch.ones_like(mean)), torch.zeros_like(rel))
        r_acc += (tilde * mf).sum(0)


def finalize_prior(f_acc: torch.Tensor, r_acc: torch.Tensor, *, mode: str = "both", lambda1: float = 1.0,
                   floor: float = 0.1, settings: dict[str, Any] | None = None,
                   outside: float | None = None) -> PositionPrior:
    """w = F/mean F + λ1 R/mean R (or one term), mean-1 normalised, clamped below at ``floor``.

    ``outside`` is the weight of the positions before the window (None: the floor)."""
    if outside is not None and not (math.isfinite(outside) and outside >= 0):
        raise ValueError(f"outside must be a finite weight >= 0, got {outside!r}")
    if mode not in PRIOR_MODES:
        raise ValueError(f"unknown prior mode {mode!r}; choose from {PRIOR_MODES}")
    k = f_acc.numel()
    if mode == "uniform":
        return PositionPrior(torch.ones(k), floor=1.0, mode="uniform", settings=dict(settings or {}))
    f = f_acc.double()
    r = r_acc.double()
    fn = f / f.mean() if f.mean() > 0 else torch.zeros_like(f)
    rn = r / r.mean() if r.mean() > 0 else torch.zeros_like(r)
    if mode == "both":
        w = fn + lambda1 * rn
    elif mode == "frontier":
        w = fn
    else:
        w = rn
    if w.mean() <= 0:
        raise ValueError("prior statistics are empty (no commits / masked positions recorded)")
    w = (w / w.mean()).clamp(min=floor)
    return PositionPrior(w.float(), floor=floor, mode=mode, settings=dict(settings or {}), outside=outside)


@torch.no_grad()
def probe_prior(
    model: torch.nn.Module,
    prompts: torch.Tensor | Sequence[Sequence[int]],
    *,
    n_probe: int = 512,
    gen_length: int = 256,
    steps: int | None = None,
    block_length: int = 32,
    lambda0_schedule: str = "early",
    lambda1: float = 1.0,
    reliability: str = "prob",
    mode: str = "both",
    floor: float = 0.1,
    outside: float | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> PositionPrior:
    """FP teacher rollouts with random commits → PositionPrior over K = ``gen_length`` positions.

    prompts: LongTensor [n, P] (equal length, unpadded) or lists of ids of equal length; rollouts
    cycle through them until ``n_probe`` are done. steps defaults to gen_length (1 commit per
    step). Uses ``fair_calib_ext.sampling.generate(..., remasking="random", trace=Trace())``.
    """
    from ..sampling import Trace, generate

    if mode not in PRIOR_MODES:
        raise ValueError(f"unknown prior mode {mode!r}; choose from {PRIOR_MODES}")
    if reliability not in RELIABILITY:
        raise ValueError(f"unknown reliability {reliability!r}; choose from {RELIABILITY}")
    lambda0(1, 1, lambda0_schedule)  # validates the name
    p = prompts if isinstance(prompts, torch.Tensor) else torch.tensor([list(x) for x in prompts])
    if p.dim() != 2 or p.shape[0] == 0:
        raise ValueError("prompts must be a non-empty [n, P] batch of token ids")
    steps = steps or gen_length
    block_length = min(block_length, gen_length)
    settings = {"n_probe": n_probe, "gen_length": gen_length, "steps": steps, "block_length": block_length,
                "lambda0": lambda0_schedule, "lambda1": lambda1, "reliability": reliability,
                "prior": mode, "floor": floor, "outside": outside, "seed": seed, "policy": "random-commit",
                "prompt_len": int(p.shape[1])}
    if mode == "uniform":
        return PositionPrior(torch.ones(gen_length), floor=1.0, mode="uniform", settings=settings)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    f_acc = torch.zeros(gen_length, dtype=torch.float64)
    r_acc = torch.zeros(gen_length, dtype=torch.float64)
    vocab = model.config.vocab_size
    done = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_probe, desc="probe prior")
    while done < n_probe:
        b = min(batch_size, n_probe - done)
        idx = torch.arange(done, done + b) % p.shape[0]
        trace = Trace()
        generate(model, p[idx].to(model.device), gen_length=gen_length, steps=steps,
                 block_length=block_length, temperature=0.0, remasking="random", trace=trace, schedule="llada",
                 generator=gen)
        accumulate_trace(trace, f_acc, r_acc, lambda0_schedule=lambda0_schedule, reliability=reliability,
                         vocab_size=vocab, total_steps=steps)
        done += b
        if bar is not None:
            bar.update(b)
    if bar is not None:
        bar.close()
    return finalize_prior(f_acc, r_acc, mode=mode, lambda1=lambda1, floor=floor, settings=settings,
                          outside=outside)
