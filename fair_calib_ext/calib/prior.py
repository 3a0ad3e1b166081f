"""Stage I of FAIR-Calib: a position prior from full-precision teacher rollouts.

For every rollout, step t (1-based, t = 1..T) and generation position i (reference §3):

    F_i += λ0(t) · φ_{t,i} · 1[i committed at t]                 frontier term
    R_i += c_{t,i} / mean_{j masked}(c_{t,j}) · 1[i masked at t]   masked-stage reliability term

φ is the probe policy's per-commit fragility (:data:`PROBE_POLICIES`): ``random`` — random
commits in blocks, φ = 1 (the paper's frontier hit); ``sampler`` — the model family's own
decoding (LLaDA low-confidence, Dream entropy), φ = 1 − (p1 − p2) of the teacher at the commit;
``noise`` — the family's decoding, φ = 1 when a W4A4 RTN student's top-1 differs from the
teacher's committed token on the teacher's state. Reliability c: top-1 probability ("prob"),
1 − H/log V ("neg_entropy"), p1 − p2 ("margin"). λ0: early = (T − t + 1)/T, flat = 1, late = t/T,
exp = exp(−rate·(t − 1)/T).

Combining (:class:`PriorSpec`): ``literal`` w = F + λ1·R (the accumulation rule as written, λ1 a
real scale) or ``balanced`` w = F/mean F + λ1·R/mean R; then w / mean(w), clamped at the floor.
Modes "frontier" (R off), "masked" (F off), "uniform" (w ≡ 1) are the ablations.

Why the first default (balanced, λ0 early, λ1 = 1) was flat: with one commit per step (T = K) and
a constant c̃, a position committed at step t_c collects F = (T − t_c + 1)/T and R = t_c, and after
the per-term normalisation F/mean F + R/mean R = 2 (T − t_c + 1)/(T + 1) + 2 t_c/(T + 1) = 2 for
every position. It is kept as the preset ``balanced``; the default (:data:`DEFAULT_PRIOR`) was
chosen among non-flat presets on the val split (``select_default`` in ``python/reproduce.py``).

Mapping onto calibration data: see :mod:`fair_calib_ext.calib.data` (continuation-aligned for
(prompt, answer) samples; the trailing K positions of plain text windows, with ``outside``/the
floor before them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import CheckpointError
from ..validate import json_field, read_json

__all__ = ["PositionPrior", "finalize_prior", "probe_prior", "lambda0",
           "PRIOR_MODES", "LAMBDA0_SCHEDULES", "RELIABILITY", "PriorSpec", "PRIOR_PRESETS", "DEFAULT_PRIOR",
           "prior_spec", "ProbeStats", "probe_stats", "PROBE_POLICIES", "COMBINE", "rtn_student"]

PRIOR_MODES = ("both", "frontier", "masked", "uniform")
LAMBDA0_SCHEDULES = ("early", "flat", "late", "exp")
RELIABILITY = ("prob", "neg_entropy", "margin")


def lambda0(t: int, steps: int, schedule: str = "early", rate: float = 3.0) -> float:
    """λ0(t) for the global step t in 1..T (``rate``: the decay of ``exp``)."""
    if schedule == "early":
        return (steps - t + 1) / steps
    if schedule == "flat":
        return 1.0
    if schedule == "late":
        return t / steps
    if schedule == "exp":
        return math.exp(-rate * (t - 1) / steps)
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
        meta = read_json(js)
        floor = json_field(meta, "floor", js, "float", lo=0.0)
        mode = json_field(meta, "mode", js, "str")
        if mode not in PRIOR_MODES:
            raise CheckpointError(f"{js}: field 'mode' must be one of {PRIOR_MODES}, got {mode!r}")
        settings = json_field(meta, "settings", js, "dict", default={})
        outside = json_field(meta, "outside", js, "float", lo=0.0, nullable=True, default=None)
        try:
            weights = load_file(str(st))["weights"]
        except Exception as exc:  # noqa: BLE001 - safetensors' own error types, a missing "weights"
            raise CheckpointError(f"{st}: not a prior's weights ({type(exc).__name__}: {exc})") from None
        if weights.dim() != 1 or weights.numel() == 0 or not torch.isfinite(weights).all() or (weights < 0).any():
            raise CheckpointError(f"{st}: 'weights' must be a non-empty 1-D tensor of finite values >= 0, got "
                                  f"shape {tuple(weights.shape)}")
        window = json_field(meta, "window", js, "int", default=weights.numel())
        if window != weights.numel():
            raise CheckpointError(f"{js}: field 'window' is {window} but {st.name} holds {weights.numel()} weights")
        return cls(weights, floor=floor, mode=mode, settings=settings, outside=outside)

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


def _row_normalised(c: torch.Tensor, mf: torch.Tensor) -> torch.Tensor:
    """c̃ = c / mean(c over the row's masked positions), on masked positions (mf = mask as float);
    rows with no masked position, or a zero mean, give zeros."""
    cnt = mf.sum(1, keepdim=True)
    mean = (c * mf).sum(1, keepdim=True) / cnt.clamp(min=1)
    ok = (cnt > 0) & (mean.abs() > 0)
    return torch.where(ok, c / torch.where(ok, mean, torch.ones_like(mean)), torch.zeros_like(c)) * mf


def finalize_prior(f_acc: torch.Tensor, r_acc: torch.Tensor, *, mode: str = "both", lambda1: float = 1.0,
                   floor: float = 0.1, settings: dict[str, Any] | None = None,
                   outside: float | None = None, combine: str = "balanced") -> PositionPrior:
    """w = F/mean F + λ1 R/mean R (``balanced``) or F + λ1 R (``literal``), or one term;
    mean-1 normalised, clamped below at ``floor``.

    ``outside`` is the weight of the positions before the window (None: the floor)."""
    if combine not in COMBINE:
        raise ValueError(f"unknown combine {combine!r}; choose from {COMBINE}")
    if outside is not None and not (math.isfinite(outside) and outside >= 0):
        raise ValueError(f"outside must be a finite weight >= 0, got {outside!r}")
    if mode not in PRIOR_MODES:
        raise ValueError(f"unknown prior mode {mode!r}; choose from {PRIOR_MODES}")
    k = f_acc.numel()
    if mode == "uniform":
        return PositionPrior(torch.ones(k), floor=1.0, mode="uniform", settings=dict(settings or {}))
    f = f_acc.double()
    r = r_acc.double()
    if combine == "balanced":
        fn = f / f.mean() if f.mean() > 0 else torch.zeros_like(f)
        rn = r / r.mean() if r.mean() > 0 else torch.zeros_like(r)
    else:  # the raw sums: λ1 is a real scale between the two terms
        fn, rn = f, r
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


def probe_prior(
    model: torch.nn.Module,
    prompts: torch.Tensor | Sequence[Sequence[int]],
    spec: PriorSpec | None = None,
    *,
    n_probe: int = 512,
    gen_length: int = 256,
    steps: int | None = None,
    block_length: int = 32,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    **spec_overrides: Any,
) -> PositionPrior:
    """Stage I: probe the FP teacher (``spec.policy``) and build the prior over K = ``gen_length``.

    ``spec`` defaults to the preset :data:`DEFAULT_PRIOR`; keyword overrides (``mode=``,
    ``lambda1=``, ``lambda0_schedule=`` or ``lambda0=``, ...) replace its fields.
    """
    if "lambda0_schedule" in spec_overrides:
        spec_overrides["lambda0"] = spec_overrides.pop("lambda0_schedule")
    spec = dataclasses.replace(spec or PRIOR_PRESETS[DEFAULT_PRIOR],
                               **{k: v for k, v in spec_overrides.items() if v is not None})
    if spec.mode == "uniform":
        return PositionPrior(torch.ones(gen_length), floor=1.0, mode="uniform", settings=spec.to_dict())
    stats = probe_stats(model, prompts, policy=spec.policy, n_probe=n_probe, gen_length=gen_length, steps=steps,
                        block_length=block_length, batch_size=batch_size, seed=seed, progress=progress)
    return stats.prior(spec)


# ---- appended: probe statistics, prior specs and presets -----------------------------------

PROBE_POLICIES = ("random", "sampler", "noise")
COMBINE = ("balanced", "literal")


@dataclass(frozen=True)
class PriorSpec:
    """How a prior is made from probe statistics (everything but the rollouts themselves).

    policy: ``random`` (the paper: random commits in blocks, frontier term = λ0·1[commit]);
    ``sampler`` (the family's deployment sampler, frontier term = λ0·(1 − p1 + p2) at the
    commit, i.e. small-margin commits count most); ``noise`` (the deployment sampler on the FP
    teacher, frontier term = λ0·1[an RTN student's top-1 differs from the teacher's commit]).
    combine: ``literal`` (w = F + λ1·R, the accumulation rule as written) or ``balanced``
    (w = F/mean F + λ1·R/mean R, the first project default; flat with λ0 early, see the module
    docstring). mode: both | frontier (R off) | masked (F off) | uniform.
    """

    policy: str = "random"
    mode: str = "both"
    combine: str = "literal"
    lambda0: str = "early"
    lambda0_rate: float = 3.0
    lambda1: float = 0.01
    reliability: str = "prob"
    floor: float = 0.1
    outside: float | None = None

    def __post_init__(self) -> None:
        for name, val, allowed in (("policy", self.policy, PROBE_POLICIES), ("mode", self.mode, PRIOR_MODES),
                                   ("combine", self.combine, COMBINE), ("lambda0", self.lambda0, LAMBDA0_SCHEDULES),
                                   ("reliability", self.reliability, RELIABILITY)):
            if val not in allowed:
                raise ValueError(f"prior {name} must be one of {allowed}, got {val!r}")
        for name, val in (("lambda0_rate", self.lambda0_rate), ("lambda1", self.lambda1), ("floor", self.floor)):
            if not (math.isfinite(val) and val >= 0):
                raise ValueError(f"prior {name} must be a finite number >= 0, got {val!r}")
        if self.outside is not None and not (math.isfinite(self.outside) and self.outside >= 0):
            raise ValueError(f"prior outside must be a finite weight >= 0, got {self.outside!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Candidate priors. The CLI default (DEFAULT_PRIOR) was chosen among the candidates whose window
# max/min >= 1.5 on the *val* split only, by the rule in python/reproduce.py (lowest mean val
# frontier flip rate over both embedded models; within 0.10 points, higher val accuracy).
PRIOR_PRESETS: dict[str, PriorSpec] = {
    "balanced": PriorSpec(combine="balanced", lambda1=1.0),  # the first default (flat)
    "literal": PriorSpec(combine="literal", lambda1=0.01),
    "literal-0.03": PriorSpec(combine="literal", lambda1=0.03),
    "exp": PriorSpec(combine="literal", lambda1=0.01, lambda0="exp", lambda0_rate=6.0),
    "margin": PriorSpec(combine="balanced", lambda1=1.0, reliability="margin"),
    "sampler": PriorSpec(policy="sampler", combine="literal", lambda1=0.01),
    "sampler-frontier": PriorSpec(policy="sampler", mode="frontier"),
    "noise": PriorSpec(policy="noise", combine="literal", lambda1=0.01),
}
DEFAULT_PRIOR = "noise"  # val selection of 2026-11-30 on the first-generation models, see REPORT_gen1.md


def prior_spec(preset: str = DEFAULT_PRIOR, **overrides: Any) -> PriorSpec:
    """A preset with some fields replaced (``None`` overrides are ignored)."""
    if preset not in PRIOR_PRESETS:
        raise ValueError(f"unknown prior preset {preset!r}; choose from {sorted(PRIOR_PRESETS)}")
    return dataclasses.replace(PRIOR_PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class ProbeStats:
    """Per-rollout, per-position Stage I statistics [N, K]: enough to build any PriorSpec of the
    same policy (and any prefix of the rollouts) without probing again."""

    policy: str
    steps: int
    commit_step: torch.Tensor  # 1-based global step at which position i was committed (0: never)
    frontier: torch.Tensor  # the policy's per-commit fragility (1, 1 − margin, or disagreement)
    masked_rel: dict[str, torch.Tensor]  # Σ over masked steps of c̃ for each reliability kind
    settings: dict[str, Any] = field(default_factory=dict)
    time_s: float = 0.0

    @property
    def n(self) -> int:
        return int(self.commit_step.shape[0])

    def accumulators(self, spec: PriorSpec, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(F, R) [K] over the first ``n`` rollouts."""
        n = self.n if n is None else n
        cs = self.commit_step[:n]
        lam = torch.tensor([0.0] + [lambda0(t, self.steps, spec.lambda0, spec.lambda0_rate)
                                    for t in range(1, self.steps + 1)], dtype=torch.float64)
        f = (lam[cs] * self.frontier[:n].double()).sum(0)
        r = self.masked_rel[spec.reliability][:n].double().sum(0)
        return f, r

    def prior(self, spec: PriorSpec, n: int | None = None) -> "PositionPrior":
        if spec.policy != self.policy:
            raise ValueError(f"these statistics come from the {self.policy!r} probe, the spec asks for {spec.policy!r}")
        f, r = self.accumulators(spec, n)
        settings = {**self.settings, **spec.to_dict(), "n_probe": self.n if n is None else n}
        return finalize_prior(f, r, mode=spec.mode, lambda1=spec.lambda1, floor=spec.floor, settings=settings,
                              outside=spec.outside, combine=spec.combine)


def _stats_from_trace(trace: Any, vocab: int, student_top1: list[torch.Tensor] | None, policy: str,
                      teacher_top1: list[torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    steps = len(trace.masked)
    b, g = trace.masked[0].shape
    commit_step = torch.zeros(b, g, dtype=torch.long)
    frontier = torch.zeros(b, g, dtype=torch.float32)
    rel = {k: torch.zeros(b, g, dtype=torch.float64) for k in RELIABILITY}
    for t in range(steps):
        m = trace.masked[t].bool()
        c = trace.commit[t].bool()
        commit_step[c] = t + 1
        if policy == "random":
            frontier[c] = 1.0
        elif policy == "sampler":
            frontier[c] = (1.0 - trace.margin[t].float()).clamp(0, 1)[c]
        else:
            ref = trace.tokens[t] if teacher_top1 is None else teacher_top1[t]
            frontier[c] = (student_top1[t] != ref).float()[c]
        # a cached step's forward covers a window only: positions outside it have NaN statistics
        seen = ~torch.isnan(trace.prob[t])
        mf = (m & seen).double()
        for k in RELIABILITY:
            c_ = _reliability(k, trace.prob[t].double(), trace.entropy[t].double(), trace.margin[t].double(), vocab)
            rel[k] += _row_normalised(torch.nan_to_num(c_), mf)
    return commit_step, frontier, rel


@torch.no_grad()
def probe_stats(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    *,
    policy: str = "random",
    n_probe: int = 512,
    gen_length: int = 256,
    steps: int | None = None,
    block_length: int = 32,
    batch_size: int = 8,
    seed: int = 0,
    student: torch.nn.Module | None = None,
    progress: bool = True,
    decoder: dict[str, Any] | None = None,
) -> ProbeStats:
    """Stage I rollouts of the FP teacher → :class:`ProbeStats` over K = ``gen_length`` positions.

    prompts: token-id lists (any lengths; batched by length, left-padded with an attention mask
    where lengths differ), cycled until ``n_probe`` rollouts are done. ``random``: random commits
    in blocks of ``block_length``, one per step by default (the paper's probe). ``sampler`` /
    ``noise``: the model family's own decoding defaults (LLaDA low-confidence, Dream entropy) with
    ``steps`` (default K). ``noise`` also runs ``student`` (default: an RTN W4A4 copy of the teacher)
    on every teacher state and records whether its top-1 differs from the teacher's commit.

    ``decoder`` (``sampler`` / ``noise`` only): sampler settings that replace the family defaults,
    keys ``block_length``, ``cache`` and ``threshold`` — e.g. ``{"block_length": 4, "cache": "dual",
    "threshold": 0.9}`` probes with the Fast-dLLM decoder that will be deployed (the
    decoder-matched prior). With a cache or a threshold each rollout is its own ``generate`` call
    (Fast-dLLM decodes batch 1), a step may commit several positions, and positions outside a
    cached step's window (NaN statistics in the trace) are left out of that step's reliability.
    The noise student runs one full forward on each teacher state; with a cache the teacher runs
    one too and the frontier compares the two (the cache's own approximation is not counted).
    """
    import time as _time

    from ..eval.accuracy import default_gen_kwargs, length_buckets, pad_batch
    from ..sampling import Trace, generate

    if policy not in PROBE_POLICIES:
        raise ValueError(f"unknown probe policy {policy!r}; choose from {PROBE_POLICIES}")
    if n_probe < 1 or gen_length < 1 or batch_size < 1:
        raise ValueError(f"n_probe, gen_length and batch_size must be >= 1, got {n_probe}, {gen_length}, {batch_size}")
    plist = [list(map(int, p)) for p in (prompts.tolist() if isinstance(prompts, torch.Tensor) else prompts)]
    if not plist or any(len(p) == 0 for p in plist):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    t0 = _time.perf_counter()
    steps = steps or gen_length
    if policy == "random":
        if decoder:
            raise ValueError("decoder applies to the 'sampler' and 'noise' policies, not 'random'")
        block_length = min(block_length, gen_length)
        gkw: dict[str, Any] = {"block_length": block_length, "remasking": "random", "schedule": "llada"}
    else:
        dec = dict(decoder or {})
        bad = set(dec) - {"block_length", "cache", "threshold"}
        if bad:
            raise ValueError(f"decoder: unknown keys {sorted(bad)}; allowed: block_length, cache, threshold")
        d = default_gen_kwargs(model, gen_length=gen_length, steps=steps,
                               generation_config=getattr(model, "generation_config", {}), **dec)
        gkw = {"block_length": d["block_length"], "remasking": d["remasking"]}
        if "cache" in d:  # Fast-dLLM decoding (a cache or a threshold): one prompt per generate call
            gkw.update(cache=d["cache"], threshold=d["threshold"])
            batch_size = 1
    if policy == "noise" and student is None:
        student = rtn_student(model)
    order = [plist[i % len(plist)] for i in range(n_probe)]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pad = int(getattr(model.config, "pad_token_id", 0) or 0)
    vocab = model.config.vocab_size
    dev = next(model.parameters()).device
    parts: list[tuple[list[int], torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_probe, desc=f"probe prior ({policy})")
    for idx in length_buckets(order, batch_size):
        x, mask = pad_batch([order[i] for i in idx], pad, dev)
        tr = Trace()
        generate(model, x, gen_length=gen_length, steps=steps, temperature=0.0, trace=tr, generator=gen,
                 attention_mask=mask, **gkw)
        s_top1 = t_top1 = None
        if policy == "noise":
            s_top1 = []
            # with a KV cache the teacher committed from approximate (cached) states; the
            # student's full forward is compared with the teacher's full forward on the same
            # state, so the frontier counts quantization disagreements, not the cache's
            t_top1 = [] if gkw.get("cache") else None
            full_mask = None if mask is None else torch.cat([mask, torch.ones(mask.shape[0], gen_length, dtype=mask.dtype,
                                                                               device=mask.device)], 1)
            for t in range(len(tr.canvas)):
                state = torch.cat([x, tr.canvas[t].to(dev)], 1)
                lg = student.denoise_logits(state, full_mask)[:, x.shape[1]:]
                s_top1.append(lg.argmax(-1).cpu())
                if t_top1 is not None:
                    t_top1.append(model.denoise_logits(state, full_mask)[:, x.shape[1]:].argmax(-1).cpu())
        cs, fr, rel = _stats_from_trace(tr, vocab, s_top1, policy, t_top1)
        parts.append((idx, cs, fr, rel))
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    # back to the rollout order, so that the first n rollouts are a fixed prefix for any n
    n = len(order)
    cs_all = torch.zeros(n, gen_length, dtype=torch.long)
    fr_all = torch.zeros(n, gen_length)
    rel_all = {k: torch.zeros(n, gen_length, dtype=torch.float64) for k in RELIABILITY}
    for idx, cs, fr, rel in parts:
        it = torch.tensor(idx)
        cs_all[it], fr_all[it] = cs, fr
        for k in RELIABILITY:
            rel_all[k][it] = rel[k]
    settings = {"policy": policy, "gen_length": gen_length, "steps": steps, "seed": seed,
                "sampler": {k: v for k, v in gkw.items()}, "n_prompts": len(plist)}
    return ProbeStats(policy, steps, cs_all, fr_all, rel_all, settings, _time.perf_counter() - t0)


def rtn_student(model: torch.nn.Module) -> torch.nn.Module:
    """A W4A4 RTN copy of ``model`` (no data needed) for the noise-aware probe.

    The student shares the teacher's embeddings, final norm and LM head (they are not
    quantized) and builds its blocks one at a time from copies of the teacher's, so it costs
    the int4 blocks, not a second full-precision model.
    """
    from ..models.streaming import ModuleLayerSource
    from .layerwise import calibrate

    with torch.device("meta"):
        st = type(model)(model.config)
    st.embed_tokens, st.norm, st.lm_head = model.embed_tokens, model.norm, model.lm_head
    st.layer_source = ModuleLayerSource(model)
    st.generation_config = dict(getattr(model, "generation_config", {}) or {})
    calibrate(st, "rtn", torch.zeros(1, 2, dtype=torch.long), None, device=next(model.parameters()).device,
              progress=False)
    return st.eval()
