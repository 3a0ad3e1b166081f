#!/usr/bin/env python
"""Reproduce the FAIR-Calib comparison on the embedded tiny models → REPORT.md + plots.

For each model (default tiny-llada and tiny-dream) and seed, at W4A4:
- rows: FP, RTN, SmoothQuant, QuaRot, QuaRot+GPTQ, FlatQuant (FP inputs, as FlatQuant's code),
  FAIR-Calib (quantized-prefix inputs + the Stage I prior);
- ablations (FAIR-Calib engine): prior uniform / frontier-only / masked-only / both, early vs
  late boost, n_probe 64 / 256 / 512 / 1024 (nested prefixes of one probing pass);
- columns: per-task exact match, average, MC-ELBO perplexity, frontier flip rate, post-commit
  mismatch (+ mean-disagree / never-agree subsets), median and p90 stability lag, calibration
  time; mean ± std over seeds.

Calibration data (Stage II): the corpus' train-split task lines joined by EOS into one stream and
cut into ``seqlen``-token windows (the paper's "windows of a text stream"); the prior covers the
trailing ``K`` = generation-length positions. Stage I probes with the first ``seqlen - K`` tokens
of windows drawn with another seed, random commits in blocks of ``probe_block``.
The seed changes the calibration windows, the probe prompts and the methods' own randomness;
evaluation sets are fixed (seed 0), so the std measures calibration variability.

Every finished (model, row, seed) is cached as JSON under ``--out``; re-running resumes, and
``--deadline-min`` stops launching runs so the report is written from what finished (missing
runs are listed in the report).

    python python/reproduce.py --quick            # minutes: 1 seed, fewer rows, small sets
    python python/reproduce.py                    # full grid (see FULL below)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fair_calib_ext.calib import (  # noqa: E402
    DEFAULT_PRIOR,
    PRIOR_PRESETS,
    CalibData,
    MethodConfig,
    PositionPrior,
    ProbeStats,
    build_aligned_data,
    build_stream_data,
    calibrate,
    probe_stats,
)
from fair_calib_ext.eval.accuracy import default_gen_kwargs  # noqa: E402
from fair_calib_ext.eval.corpus import calib_texts  # noqa: E402
from fair_calib_ext.eval.plots import (  # noqa: E402
    plot_flips_by_decile,
    plot_flips_by_position,
    plot_lag_ccdf,
    plot_prior,
)
from fair_calib_ext.eval.report import Column, default_columns, markdown_table, mean_std  # noqa: E402
from fair_calib_ext.eval.runner import evaluate_model  # noqa: E402
from fair_calib_ext.eval.stats import paired_diff_mean, paired_diff_ratio  # noqa: E402
from fair_calib_ext.eval.tasks import TASKS, make_examples  # noqa: E402
from fair_calib_ext.models import load_pretrained, load_tokenizer  # noqa: E402

MAIN_ROWS = ("FP", "RTN", "SmoothQuant", "QuaRot", "QuaRot+GPTQ", "FlatQuant", "FAIR-Calib")
# paired rows of the FAIR-Calib analysis: every seed, same calibration samples and probe prompts
PAIRED_ROWS = ("FAIR uniform", "FAIR old", "FAIR[literal]", "FAIR[sampler]")
ABLATIONS: tuple[str, ...] = ()
# the candidates of the default prior, scored on the val split (see select_default)
CANDIDATES = ("FAIR uniform", "FAIR[balanced]", "FAIR[literal]", "FAIR[literal-0.03]", "FAIR[exp]",
              "FAIR[sampler]", "FAIR[sampler-frontier]", "FAIR[noise]")
# (A, B, what it isolates): the paired differences the report gives with bootstrap CIs
PAIRS = (("FAIR-Calib", "FlatQuant", "the method vs its baseline"),
         ("FAIR-Calib", "FAIR uniform", "the prior alone (same data, engine, inputs; w ≡ 1)"),
         ("FAIR[sampler]", "FAIR[literal]", "sampler-matched vs random-commit probe (same prior rule)"),
         ("FAIR-Calib", "FAIR old", "new default vs the old one (aligned data + prior vs stream + flat prior)"))
SINGLE_SEED_ROWS = ("FP", "RTN", "SmoothQuant", "QuaRot", "QuaRot+GPTQ")  # cheap baselines: first seed only


@dataclass
class Scale:
    """Everything that sets the size of a reproduction run."""

    models: list[str] = field(default_factory=lambda: ["tiny-llada", "tiny-dream"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    rows: list[str] = field(default_factory=lambda: list(MAIN_ROWS) + list(PAIRED_ROWS))
    ablations: list[str] = field(default_factory=lambda: list(ABLATIONS))
    ablation_seeds: list[int] = field(default_factory=lambda: [0])
    select_seeds: list[int] = field(default_factory=lambda: [0])
    n_calib: int = 64  # calibration sequences
    seqlen: int = 64  # tokens per sequence
    probe_block: int = 4  # Stage I block length of the random-commit probe
    n_probe: int = 512  # rollouts per prior
    probe_batch: int = 64
    epochs: int = 15  # FlatQuant / FAIR epochs per block (the paper's 15)
    calib_batch: int = 4
    n_eval: int = 300  # test examples per task
    n_metrics: int = 512  # prompts for the mechanism metrics
    n_ppl: int = 48  # held-out texts
    mc_num: int = 32  # MC-ELBO samples
    n_val: int = 100  # val examples per task (selection)
    n_val_metrics: int = 256  # val prompts for the flip rate (selection)
    n_boot: int = 2000
    batch_size: int = 64


FULL = Scale()
QUICK = Scale(seeds=[0, 1], rows=["FP", "RTN", "FlatQuant", "FAIR-Calib", "FAIR uniform"], ablations=[],
              n_calib=16, seqlen=48, n_probe=32, probe_batch=16, epochs=1, n_eval=6, n_metrics=12, n_ppl=12,
              mc_num=8, n_val=4, n_val_metrics=12, n_boot=200)


# ------------------------------------------------------------------------------------------
# data


def stream_windows(tok: Any, n: int, seqlen: int, seed: int) -> CalibData:
    """[n, seqlen] windows at seeded offsets of the train-split task lines joined by EOS (no
    padding, the WikiText-style recipe; the prior goes on the trailing K positions)."""
    texts = calib_texts(max(2000, n * 8), seed=seed)
    return build_stream_data(tok, texts, n, seqlen, seed, tok.eos_token_id)


def task_pairs(n: int, seed: int, split: str = "train") -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs of ``split``, the six tasks interleaved."""
    per = -(-n // len(TASKS))
    pools = {t: make_examples(t, split, per, seed=seed) for t in TASKS}
    return [(pools[t][i].prompt, pools[t][i].answer) for i in range(per) for t in TASKS][:n]


def aligned_samples(tok: Any, n: int, seqlen: int, seed: int, gen_k: int) -> CalibData:
    """(prompt, answer + EOS fill to K) samples packed into [n, seqlen] rows, prior aligned to each
    continuation (``calib.data``). The same train-split lines as ``stream_windows`` uses."""
    return build_aligned_data(tok, task_pairs(max(600, n * 8), seed), n, seqlen, seed, tok.eos_token_id, fill_to=gen_k)


def probe_prompts(tok: Any, n: int, seed: int) -> list[list[int]]:
    """Stage I prompts: train-split task prompts (another seed than the calibration samples), so
    the probe measures the positions of the continuation that Stage II aligns the prior to."""
    return [tok.encode(p, add_special_tokens=False) for p, _ in task_pairs(n, seed + 1)]


@torch.no_grad()
def visible_kl(teacher: Any, model: Any, tok: Any, k: int, scale: Scale) -> dict[str, float]:
    """Mean KL(teacher ‖ model) of the output distributions on fully visible held-out (test-split)
    aligned samples: on the continuations' first K positions (the prior's window) and elsewhere."""
    d = build_aligned_data(tok, task_pairs(600, 0, "test"), 32, scale.seqlen, 0, tok.eos_token_id, fill_to=k)
    lp = torch.log_softmax(teacher(d.ids).logits.double(), -1)
    lq = torch.log_softmax(model(d.ids).logits.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)  # [B, S]
    win = torch.zeros_like(kl, dtype=torch.bool)
    for r, seg in enumerate(d.segments):
        for st, ln in seg:
            win[r, st:st + min(ln, k)] = True
    return {"window": float(kl[win].mean()), "outside": float(kl[~win].mean())}


def row_spec(label: str) -> tuple[dict[str, Any] | None, str, str | None]:
    """(method kwargs, calibration data "stream" | "aligned", prior preset or "uniform" or None)."""
    fixed: dict[str, tuple[dict[str, Any], str, str | None]] = {
        "RTN": (dict(method="rtn"), "stream", None),
        "SmoothQuant": (dict(method="smoothquant"), "stream", None),
        "QuaRot": (dict(method="quarot"), "stream", None),
        "QuaRot+GPTQ": (dict(method="quarot+gptq"), "stream", None),
        "FlatQuant": (dict(method="flatquant", fp_inputs=True), "stream", None),
        "FAIR-Calib": (dict(method="fair"), "aligned", DEFAULT_PRIOR),
        "FAIR uniform": (dict(method="fair"), "aligned", "uniform"),
        "FAIR old": (dict(method="fair"), "stream", "balanced"),
    }
    if label == "FP":
        return None, "", None
    if label in fixed:
        return fixed[label]
    if label.startswith("FAIR[") and label.endswith("]") and label[5:-1] in PRIOR_PRESETS:
        return dict(method="fair"), "aligned", label[5:-1]
    raise ValueError(f"unknown row {label!r}; rows: {list(MAIN_ROWS) + list(PAIRED_ROWS)} or FAIR[<preset>] "
                     f"with a preset of {sorted(PRIOR_PRESETS)}")


def canonical(label: str) -> str:
    """The row that runs a label's configuration (FAIR-Calib is FAIR[<default preset>])."""
    return f"FAIR[{DEFAULT_PRIOR}]" if label == "FAIR-Calib" else label


# ------------------------------------------------------------------------------------------
# runs


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s)


class Runner:
    """Runs and caches (model, row, seed, split) results."""

    def __init__(self, scale: Scale, out: Path, progress: bool) -> None:
        self.scale, self.out, self.progress = scale, out, progress
        self._teacher: dict[str, Any] = {}
        self._probe: dict[tuple[str, int, str], ProbeStats] = {}
        self._sha: dict[str, str] = {}

    def path(self, model: str, row: str, seed: int, split: str = "test") -> Path:
        # keyed by the weights' hash too, so a retrained model never reuses another model's results
        if model not in self._sha:
            self._sha[model] = _sha(model)
        sub = "runs" if split == "test" else f"runs-{split}"
        return (self.out / sub / f"{_slug(Path(model).name)}-{self._sha[model]}" / _slug(canonical(row))
                / f"seed{seed}.json")

    def teacher(self, model: str) -> tuple[Any, Any, dict[str, Any]]:
        if model not in self._teacher:
            t = load_pretrained(model)
            tok = load_tokenizer(model)
            self._teacher[model] = (t, tok, default_gen_kwargs(t, generation_config=getattr(t, "generation_config", {})))
        return self._teacher[model]

    def prior(self, model: str, seed: int, preset: str) -> tuple[PositionPrior, float]:
        sc = self.scale
        t, tok, gen = self.teacher(model)
        spec = PRIOR_PRESETS[preset]
        key = (model, seed, spec.policy)
        if key not in self._probe:
            self._probe[key] = probe_stats(t, probe_prompts(tok, sc.n_probe, seed), policy=spec.policy,
                                           n_probe=sc.n_probe, gen_length=gen["gen_length"],
                                           block_length=sc.probe_block, batch_size=sc.probe_batch, seed=seed,
                                           progress=False)
        st = self._probe[key]
        return st.prior(spec), st.time_s

    def run(self, model: str, row: str, seed: int, split: str = "test") -> dict[str, Any]:
        p = self.path(model, row, seed, split)
        if p.is_file():
            return json.loads(p.read_text())
        sc = self.scale
        t_run = time.perf_counter()
        teacher, tok, gen = self.teacher(model)
        if split == "test":
            common = dict(tasks=list(TASKS), want_ppl=True, want_metrics=True, n=sc.n_eval, n_ppl=sc.n_ppl,
                          n_metrics=sc.n_metrics)
        else:  # selection: accuracy and flips on val prompts, nothing from the test split
            common = dict(tasks=list(TASKS), want_ppl=False, want_metrics=True, n=sc.n_val, n_metrics=sc.n_val_metrics)
        common.update(seed=0, split=split, mc_num=sc.mc_num, batch_size=sc.batch_size, gen_kwargs=gen,
                      progress=self.progress)
        kw, data_kind, preset = row_spec(row)
        res: dict[str, Any] = {"model": model, "row": canonical(row), "seed": seed, "split": split}
        if kw is None:
            res.update(evaluate_model(teacher, tok, **common))
        else:
            torch.manual_seed(seed)
            cfg = MethodConfig(**kw, seed=seed, epochs=sc.epochs, batch_size=sc.calib_batch)
            prior, probe_s = (None, 0.0)
            if preset == "uniform":
                prior = PositionPrior.uniform(gen["gen_length"])
            elif preset is not None:
                prior, probe_s = self.prior(model, seed, preset)
            k = gen["gen_length"]
            data = (aligned_samples(tok, sc.n_calib, sc.seqlen, seed, k) if data_kind == "aligned"
                    else stream_windows(tok, sc.n_calib, sc.seqlen, seed))
            if data_kind == "stream" and prior is not None and prior.mode != "uniform":
                prior.outside = None  # trailing-K mapping of the old default: floor before the window
            qm = load_pretrained(model)
            t0 = time.perf_counter()
            calibrate(qm, cfg, data, prior, progress=False)
            res["calib_time_s"] = time.perf_counter() - t0
            res["probe_time_s"] = probe_s
            res["method_config"] = cfg.to_dict()
            res["data"] = data_kind
            if prior is not None:
                res["prior"] = {"weights": prior.weights.tolist(), "mode": prior.mode, "settings": prior.settings,
                                "preset": preset}
            res.update(evaluate_model(qm, tok, teacher=teacher, **common))
            if split == "test":
                res["visible_kl"] = visible_kl(teacher, qm, tok, k, sc)
            del qm
        res["run_time_s"] = time.perf_counter() - t_run
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1, default=float))
        os.replace(tmp, p)
        return res


# ------------------------------------------------------------------------------------------
# selection of the default prior (val split only)


SELECT_TIE = 0.10  # flip-rate points within which val accuracy decides
SELECT_MIN_RATIO = 1.5  # a default prior must have max/min >= this inside its window


def select_default(val: dict[tuple[str, str, int], dict[str, Any]], models: list[str]) -> dict[str, Any]:
    """The selection rule, fixed before any test-split number of the candidates was computed:

    1. eligible: FAIR[<preset>] candidates whose prior has max/min >= 1.5 inside its window on
       every model and seed (a default must not be flat);
    2. score: val frontier flip rate (%), averaged over models and selection seeds; lowest wins;
    3. tie-break: candidates within 0.10 flip points of the best are ranked by mean val accuracy.
    Returns the table of candidates and the choice."""
    rows: dict[str, dict[str, Any]] = {}
    for (m, r, s), v in val.items():
        d = rows.setdefault(r, {"flips": [], "acc": [], "ratio": []})
        d["flips"].append(100 * (v["metrics"]["flips"]["rate"] or 0.0))
        d["acc"].append(100 * v["tasks"]["avg"])
        w = v.get("prior", {}).get("weights")
        d["ratio"].append(max(w) / max(min(w), 1e-12) if w else 1.0)
    table = []
    for r, d in rows.items():
        table.append({"row": r, "flips": sum(d["flips"]) / len(d["flips"]), "acc": sum(d["acc"]) / len(d["acc"]),
                      "min_ratio": min(d["ratio"]), "eligible": r.startswith("FAIR[") and min(d["ratio"]) >= SELECT_MIN_RATIO,
                      "n": len(d["flips"])})
    elig = [t for t in table if t["eligible"]]
    choice = None
    if elig:
        best = min(t["flips"] for t in elig)
        near = [t for t in elig if t["flips"] <= best + SELECT_TIE]
        choice = max(near, key=lambda t: t["acc"])["row"]
    return {"table": sorted(table, key=lambda t: t["flips"]), "choice": choice,
            "rule": select_default.__doc__}


# ------------------------------------------------------------------------------------------
# report


def _avg(runs: list[dict[str, Any]], path: str, scale: float = 1.0) -> tuple[float | None, float | None, int]:
    col = Column("", path, scale)
    return mean_std([col.value(r) for r in runs])


def _fmt(m: float | None, s: float | None, d: int = 1, unit: str = "") -> str:
    if m is None:
        return "n/a"
    return f"{m:.{d}f}{unit}" + (f" ± {s:.{d}f}" if s is not None else "")


def pattern_section(model: str, res: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Plain statements comparing the measured pattern with the paper's."""
    lines = []
    get = lambda row, path, sc=100.0: _avg(res.get(row, []), path, sc)  # noqa: E731
    acc = {r: get(r, "tasks.avg") for r in res}
    flips = {r: get(r, "metrics.flips.rate") for r in res}
    mism = {r: get(r, "metrics.mismatch.rate") for r in res}
    order = [r for r in ("FAIR-Calib", "FlatQuant", "QuaRot", "RTN") if acc.get(r, (None,))[0] is not None]
    if len(order) >= 2:
        vals = [acc[r][0] for r in order]
        holds = all(a > b for a, b in zip(vals, vals[1:]))
        lines.append(f"- Average accuracy order FAIR-Calib > FlatQuant > QuaRot > RTN (paper): "
                     f"{'**holds**' if holds else '**does not hold**'} — "
                     + ", ".join(f"{r} {acc[r][0]:.1f}%" for r in order) + ".")
    fp, fq, fa = acc.get("FP", (None,))[0], acc.get("FlatQuant", (None,))[0], acc.get("FAIR-Calib", (None,))[0]
    if None not in (fp, fq, fa):
        gap = fp - fq
        if gap <= 0:
            lines.append(f"- FlatQuant→FP accuracy gap: none to close (FP {fp:.1f}%, FlatQuant {fq:.1f}%); "
                         f"FAIR-Calib {fa:.1f}%.")
        else:
            closed = (fa - fq) / gap
            lines.append(f"- FAIR-Calib closes {100 * closed:.0f}% of the FlatQuant→FP gap ({fq:.1f}% → {fa:.1f}%, "
                         f"FP {fp:.1f}%); target ≥ 50%: {'**met**' if closed >= 0.5 else '**not met**'}.")
        sd = max((acc["FAIR-Calib"][1] or 0.0), (acc["FlatQuant"][1] or 0.0))
        if sd and abs(fa - fq) <= sd:
            lines.append(f"  The FAIR-Calib − FlatQuant difference ({fa - fq:+.1f} points) is within one seed std "
                         f"({sd:.1f}): not distinguishable at this scale.")
    ff, fl = flips.get("FAIR-Calib", (None,))[0], flips.get("FlatQuant", (None,))[0]
    if ff is not None and fl is not None and fl > 0:
        cut = 1 - ff / fl
        lines.append(f"- Frontier flips: FAIR-Calib {ff:.2f}% vs FlatQuant {fl:.2f}% ({100 * cut:+.0f}% reduction); "
                     f"target ≥ 30%: {'**met**' if cut >= 0.3 else '**not met**'}.")
    mf, ml = mism.get("FAIR-Calib", (None,))[0], mism.get("FlatQuant", (None,))[0]
    if mf is not None and ml is not None:
        lines.append(f"- Post-commit mismatch: FAIR-Calib {mf:.2f}% vs FlatQuant {ml:.2f}% "
                     f"({'fewer' if mf < ml else 'not fewer'}, paper: fewer).")
    lag = {r: get(r, "metrics.lag.p90", 1.0)[0] for r in ("FP", "FlatQuant", "FAIR-Calib") if r in res}
    if all(v is not None for v in lag.values()) and len(lag) == 3:
        lines.append(f"- Stability-lag tail (p90, steps): FP {lag['FP']:.1f}, FlatQuant {lag['FlatQuant']:.1f}, "
                     f"FAIR-Calib {lag['FAIR-Calib']:.1f} (paper: uniform PTQ lengthens the tail, FAIR shortens it).")
    ab = {r: acc.get(r, (None,))[0] for r in ("uniform", "frontier-only", "masked-only", "FAIR-Calib")}
    if all(v is not None for v in ab.values()):
        best = max(ab, key=lambda k: ab[k])
        lines.append("- Prior ablation (paper: both > frontier-only ≈ masked-only > uniform): "
                     + ", ".join(f"{k} {v:.1f}%" for k, v in ab.items()) + f"; best here: {best}.")
    if acc.get("late boost", (None,))[0] is not None and fa is not None:
        lines.append(f"- Early vs late boost (paper: early better): early {fa:.1f}% vs late {acc['late boost'][0]:.1f}%.")
    lines += diagnostics(res)
    lines += prior_investigation(res)
    return lines


def _pearson(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3:
        return None
    t = torch.tensor([x, y], dtype=torch.float64)
    t = t - t.mean(1, keepdim=True)
    den = float(t[0].norm() * t[1].norm())
    return float((t[0] * t[1]).sum()) / den if den > 0 else None


def prior_investigation(res: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Does the prior point where the flips are, and where did the weighted objective spend its
    budget? (seed-0 priors; flip profile of FlatQuant's seed-0 run; visible-text KL over seeds)."""
    out: list[str] = []
    first = {r: v[0] for r, v in res.items() if v}
    acc = {r: _avg(v, "tasks.avg", 100.0)[0] for r, v in res.items()}
    flips = {r: _avg(v, "metrics.flips.rate", 100.0)[0] for r, v in res.items()}
    for r in ("λ0 exp", "outside=1"):
        if None not in (acc.get(r), acc.get("FAIR-Calib"), acc.get("uniform"), flips.get(r)):
            out.append(f"- {r}: {acc[r]:.1f}% / {flips[r]:.2f}% flips (FAIR-Calib default {acc['FAIR-Calib']:.1f}% / "
                       f"{flips['FAIR-Calib']:.2f}%, uniform {acc['uniform']:.1f}% / {flips['uniform']:.2f}%).")
    ref = first.get("FlatQuant") or first.get("uniform")
    if ref and "metrics" in ref and ref["metrics"]["flips"].get("by_position"):
        prof = ref["metrics"]["flips"]["by_position"]
        ok = [i for i, v in enumerate(prof) if v is not None]
        prof_s = ", ".join(f"{100 * prof[i]:.1f}" for i in ok)
        out.append(f"- Where the flips are ({ref['row']} seed {ref['seed']}, flip % by generation position): "
                   f"{prof_s}.")
        cors = []
        for r in ("FAIR-Calib", "frontier-only", "masked-only", "late boost", "λ0 exp"):
            pr = first.get(r, {}).get("prior")
            if pr and len(pr["weights"]) == len(prof):
                w = pr["weights"]
                c = _pearson([w[i] for i in ok], [prof[i] for i in ok])
                shape = f"w from {min(w):.2f} to {max(w):.2f}, first/last position {w[0]:.2f}/{w[-1]:.2f}"
                cors.append(f"{r} ({shape}; r = {'n/a' if c is None else f'{c:+.2f}'})")
        if cors:
            out.append("- Priors and their correlation with that flip profile: " + "; ".join(cors) + ".")
    kl = {}
    for r in ("FlatQuant", "uniform", "FAIR-Calib", "outside=1", "λ0 exp"):
        win = _avg(res.get(r, []), "visible_kl.window")[0]
        oth = _avg(res.get(r, []), "visible_kl.outside")[0]
        if win is not None and oth is not None:
            kl[r] = (win, oth)
    if kl:
        out.append("- Where Stage II spent its error budget (KL(FP ‖ model) on visible held-out text, prior window / "
                   "before it): " + ", ".join(f"{r} {w:.4f} / {o:.4f}" for r, (w, o) in kl.items()) + ".")
    return out


def diagnostics(res: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Where the differences come from: input convention, the prior itself, early/late steps,
    small-margin decisions (first seed's runs for the breakdowns)."""
    out: list[str] = []
    acc = {r: _avg(v, "tasks.avg", 100.0)[0] for r, v in res.items()}
    flips = {r: _avg(v, "metrics.flips.rate", 100.0)[0] for r, v in res.items()}
    if None not in (acc.get("FlatQuant"), acc.get("uniform"), flips.get("FlatQuant"), flips.get("uniform")):
        out.append(f"- Input convention (same learning, w̄ ≡ 1): FP inputs (FlatQuant) {acc['FlatQuant']:.1f}% / "
                   f"{flips['FlatQuant']:.2f}% flips vs quantized prefix (uniform) {acc['uniform']:.1f}% / "
                   f"{flips['uniform']:.2f}% flips.")
    if None not in (acc.get("uniform"), acc.get("FAIR-Calib"), flips.get("uniform"), flips.get("FAIR-Calib")):
        out.append(f"- The prior alone (same engine and inputs): uniform {acc['uniform']:.1f}% / {flips['uniform']:.2f}% "
                   f"flips vs FAIR-Calib {acc['FAIR-Calib']:.1f}% / {flips['FAIR-Calib']:.2f}% flips.")
    first = {r: v[0] for r, v in res.items() if v and "metrics" in v[0]}
    for r in ("FlatQuant", "FAIR-Calib"):
        if r not in first:
            return out
    def halves(r: str) -> tuple[float | None, float | None]:
        f = first[r]["metrics"]["flips"]
        n = f["commits_by_step_decile"]
        rates = f["by_step_decile"]
        def part(ds):
            num = sum((rates[d] or 0.0) * n[d] for d in ds)
            den = sum(n[d] for d in ds)
            return 100.0 * num / den if den else None
        return part(range(5)), part(range(5, 10))
    (e1, l1), (e2, l2) = halves("FlatQuant"), halves("FAIR-Calib")
    if None not in (e1, l1, e2, l2):
        out.append(f"- Flips in the first / second half of the steps (seed {first['FAIR-Calib']['seed']}): "
                   f"FlatQuant {e1:.2f}% / {l1:.2f}%, FAIR-Calib {e2:.2f}% / {l2:.2f}%.")
    def low_margin(r: str) -> str:
        b = [x for x in first[r]["metrics"]["flips"]["by_margin"] if x["hi"] <= 0.1 and x["n"]]
        n = sum(x["n"] for x in b)
        k = sum((x["rate"] or 0.0) * x["n"] for x in b)
        return f"{100.0 * k / n:.1f}% of {n}" if n else "none"
    out.append(f"- Flip rate on small-margin commits (teacher p1 − p2 < 0.1): FlatQuant {low_margin('FlatQuant')}, "
               f"FAIR-Calib {low_margin('FAIR-Calib')}.")
    pr = first["FAIR-Calib"].get("prior")
    if pr:
        w = pr["weights"]
        h = len(w) // 2
        out.append(f"- Prior shape: min {min(w):.3f}, max {max(w):.3f}; mean over the first half of the window "
                   f"{sum(w[:h]) / max(h, 1):.3f} vs second half {sum(w[h:]) / max(len(w) - h, 1):.3f}.")
        if max(abs(x - 1.0) for x in w) < 0.05:
            out.append(
                "  The 'both' prior is nearly flat. This follows from the defaults, not from noise: with one commit "
                "per step, a position committed at step t_c gets F = λ0(t_c) = (T − t_c + 1)/T and, if c̃ does not "
                "depend on position, R = c̃·t_c (it is masked for t_c steps). Then F/mean F + R/mean R = "
                "2(T + 1 − t_c)/(T + 1) + 2 t_c/(T + 1) = 2 for every position: the linear early boost and the "
                "balanced masked term cancel exactly, and only the position dependence of c̃ is left. The "
                "frontier-only and masked-only ablations keep their shape.")
    return out


def _sha(model: str) -> str:
    import hashlib

    from fair_calib_ext.models import resolve_model_path

    try:
        f = resolve_model_path(model) / "model.safetensors"
        return hashlib.sha256(f.read_bytes()).hexdigest()[:12]
    except (OSError, ValueError):
        return "unknown"


def _git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_report(runner: Runner, done: dict[tuple[str, str, int], dict[str, Any]], missing: list[tuple[str, str, int]],
                 report: Path, wall_s: float, preset: str) -> None:
    sc = runner.scale
    plot_dir = report.parent / "report_plots"
    cols = default_columns(TASKS, True, True, with_calib_time=True)
    out: list[str] = ["# FAIR-Calib reproduction on the embedded tiny models (W4A4)", ""]
    out.append(f"Generated by `python/reproduce.py` ({preset}) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
               f"{platform.machine()} CPU, {os.cpu_count()} cores (shared with other jobs), torch {torch.__version__}; "
               f"{len(done)} runs, {sum(v.get('run_time_s', 0.0) for v in done.values()) / 60:.1f} min of run time in "
               f"total (this call: {wall_s / 60:.1f} min). All numbers below were measured by these runs; nothing is "
               "copied from the paper.")
    out += ["", "## Setup", ""]
    out.append(f"- Models: {', '.join(f'{Path(m).name} (model.safetensors sha256 {_sha(m)})' for m in sc.models)}; "
               f"repository commit {_git_head()}; seeds "
               f"{sc.seeds} (mean ± sample std over seeds; the seed changes the "
               "calibration windows, the probe prompts and the methods' randomness; evaluation sets are fixed).")
    out.append(f"- Calibration: {sc.n_calib} windows × {sc.seqlen} tokens of the train-split corpus stream; "
               f"FlatQuant/FAIR-Calib {sc.epochs} epoch(s) per block (the paper uses 15), batch {sc.calib_batch}. "
               "FlatQuant feeds FP inputs to the student block (its released code); FAIR-Calib and its ablations feed "
               "the quantized prefix.")
    out.append(f"- Stage I prior: {sc.n_probe} random-commit rollouts (blocks of {sc.probe_block}), λ0 early, "
               "c̃ = top-1 prob, balanced λ1 = 1, floor 0.1; trailing window = generation length.")
    out.append(f"- Ablation rows (seed{'s' if len(sc.ablation_seeds) > 1 else ''} "
               f"{', '.join(map(str, sc.ablation_seeds))}): uniform = w̄ ≡ 1 with FAIR-Calib's engine (quantized-prefix "
               "inputs); frontier-only / masked-only = one term of the prior; late boost = λ0(t) = t/T; λ0 exp = "
               "exp(−3(t−1)/T), a non-linear early boost that does not cancel against the masked term; outside=1 = the "
               "default prior but weight 1 (not the 0.1 floor) on the positions before the window, so the context "
               "positions stay in the loss; n_probe=N = the default prior from the first N rollouts of one probing pass.")
    out.append(f"- Evaluation: {sc.n_eval} test examples per task (exact match), MC-ELBO perplexity on {sc.n_ppl} "
               f"held-out lines (mc_num {sc.mc_num}, common random numbers), mechanism metrics on {sc.n_metrics} "
               "prompts (§6 definitions; flips/mismatch teacher-forced on the FP trajectory, lag on each model's own "
               "rollout). Greedy decoding, one token per step (LLaDA low_confidence, one block; Dream entropy).")
    out.append("- Columns: task accuracies and avg in %; ppl = exp(NELBO/token); flip %, mismatch % (+ on the teacher's "
               "mean-disagree and never-agree subsets); KL(FP‖model) at commits; lag median/p90 in steps; calib s = "
               "Stage II time (the Stage I probe time is listed separately in runs/*.json).")
    if missing:
        out += ["", f"**Not run (time budget): {len(missing)} runs** — "
                + "; ".join(f"{Path(m).name}/{r}/seed{s}" for m, r, s in missing[:40])
                + (" ..." if len(missing) > 40 else "") + "."]
    for model in sc.models:
        name = Path(model).name
        res: dict[str, list[dict[str, Any]]] = {}
        for (m, r, s), v in done.items():
            if m == model:
                res.setdefault(r, []).append(v)
        if not res:
            continue
        out += ["", f"## {name}", ""]
        main_rows = [(r, res[r]) for r in sc.rows if r in res]
        out.append(markdown_table(main_rows, cols, first_header="method"))
        abl_rows = [(r, res[r]) for r in ["FAIR-Calib"] + list(sc.ablations) if r in res and (r != "FAIR-Calib" or sc.ablations)]
        if len(abl_rows) > 1:
            out += ["", f"Ablations ({name}; FAIR-Calib engine; 'FAIR-Calib' = both terms, early boost, "
                    f"n_probe {sc.n_probe}):", ""]
            out.append(markdown_table(abl_rows, cols, first_header="ablation"))
        out += ["", "Against the paper's pattern:", ""]
        out += pattern_section(model, res) or ["- not enough rows finished to compare."]
        seed0 = {r: v[0] for r, v in res.items()}
        curves = [(r, seed0[r]["metrics"]["lag"]["ccdf"]) for r in ("FP", "RTN", "QuaRot", "FlatQuant", "FAIR-Calib")
                  if r in seed0 and "metrics" in seed0[r]]
        imgs = []
        if curves:
            imgs.append(plot_lag_ccdf(curves, plot_dir / f"{name}_lag_ccdf.png", title=f"{name}: stability lag CCDF"))
        series = [(r, seed0[r]["metrics"]["flips"]["by_step_decile"]) for r in ("RTN", "QuaRot", "FlatQuant", "FAIR-Calib")
                  if r in seed0 and "metrics" in seed0[r]]
        if series:
            imgs.append(plot_flips_by_decile(series, plot_dir / f"{name}_flips_by_decile.png",
                                             title=f"{name}: frontier flips by step decile"))
        pos = [(r, seed0[r]["metrics"]["flips"]["by_position"]) for r in ("RTN", "FlatQuant", "FAIR-Calib")
               if r in seed0 and "metrics" in seed0[r] and seed0[r]["metrics"]["flips"].get("by_position")]
        pri = [(r, seed0[r]["prior"]["weights"]) for r in ("FAIR-Calib", "frontier-only", "λ0 exp")
               if r in seed0 and "prior" in seed0[r]]
        if pos:
            imgs.append(plot_flips_by_position(pos, pri, plot_dir / f"{name}_flips_by_position.png",
                                               title=f"{name}: flips by position (seed 0) and priors"))
        if "FAIR-Calib" in seed0 and "prior" in seed0["FAIR-Calib"]:
            imgs.append(plot_prior(seed0["FAIR-Calib"]["prior"]["weights"], plot_dir / f"{name}_prior.png",
                                   title=f"{name}: position prior (seed {seed0['FAIR-Calib']['seed']})"))
        if imgs:
            out += [""] + [f"![{Path(i).stem}]({os.path.relpath(i, report.parent)})" for i in imgs]
    report.write_text("\n".join(out) + "\n")


# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small preset (minutes)")
    ap.add_argument("--stage", choices=("select", "test", "all"), default="all",
                    help="select: score the prior candidates on the val split and print the choice; "
                         "test: the paired grid on the test split + REPORT.md; all: both")
    ap.add_argument("--out", default="runs/reproduce", help="cache of per-run JSON results")
    ap.add_argument("--report", default="REPORT.md")
    ap.add_argument("--deadline-min", type=float, default=None, help="stop starting runs after this many minutes")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=1,
                    help="worker processes, one model each (1 thread per worker); the report is written after all")
    ap.add_argument("--runs-only", action="store_true", help=argparse.SUPPRESS)  # worker mode: no report
    for f in dataclasses.fields(Scale):
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind.startswith("list"):
            ap.add_argument(f"--{f.name.replace('_', '-')}", nargs="*", default=None,
                            type=int if "int" in kind else str)
        else:
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    base = QUICK if a.quick else FULL
    scale = dataclasses.replace(base, **{f.name: getattr(a, f.name) for f in dataclasses.fields(Scale)
                                         if getattr(a, f.name) is not None})
    for r in scale.rows + scale.ablations + list(CANDIDATES):
        row_spec(r)
    t0 = time.perf_counter()  # the report's "this call" includes the workers
    if a.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {a.jobs}")
    use_workers = a.jobs > 1 and len(scale.models) > 1
    if use_workers:
        raw = list(sys.argv[1:] if argv is None else argv)
        groups = [scale.models[i::a.jobs] for i in range(min(a.jobs, len(scale.models)))]
        # later flags win in argparse: each worker gets its models, one thread, no report
        procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *raw, "--models", *g, "--jobs", "1",
                                   "--threads", "1", "--runs-only", "--no-progress"]) for g in groups]
        rcs = [p.wait() for p in procs]
        if any(rcs):
            print(f"worker exit codes {rcs}", file=sys.stderr)
            return max(rcs)
    out = Path(a.out)
    runner = Runner(scale, out, progress=not a.no_progress)
    plan: list[tuple[str, str, int, str]] = []
    if a.stage in ("select", "all"):
        for seed in scale.select_seeds:
            for model in scale.models:
                plan += [(model, r, seed, "val") for r in CANDIDATES]
    if a.stage in ("test", "all"):
        for seed in scale.seeds:  # seed-major: a cut-off run still has every row for the first seeds
            for model in scale.models:
                plan += [(model, r, seed, "test") for r in scale.rows
                         if r not in SINGLE_SEED_ROWS or seed == scale.seeds[0]]
        for seed in scale.ablation_seeds:
            for model in scale.models:
                plan += [(model, r, seed, "test") for r in scale.ablations]
    done: dict[tuple[str, str, int, str], dict[str, Any]] = {}
    missing: list[tuple[str, str, int, str]] = []
    for i, key in enumerate(plan):
        cached = runner.path(*key).is_file()
        # after workers, what they did not finish stays missing rather than being run here
        if not cached and (use_workers or (a.deadline_min is not None and time.perf_counter() - t0 > 60 * a.deadline_min)):
            missing.append(key)
            continue
        r0 = time.perf_counter()
        done[key] = runner.run(*key)
        print(f"[{i + 1}/{len(plan)}] {Path(key[0]).name} {key[1]} seed {key[2]} {key[3]}: "
              f"avg {100 * done[key]['tasks']['avg']:.1f}% flips {100 * (done[key]['metrics']['flips']['rate'] or 0):.2f}% "
              f"({'cached' if cached else f'{time.perf_counter() - r0:.0f}s'})", flush=True)
    if a.runs_only:
        return 0
    val = {(m, r, s): v for (m, r, s, sp), v in done.items() if sp == "val"}
    selection = select_default(val, scale.models) if val else None
    if selection is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "selection.json").write_text(json.dumps(selection, indent=1))
        print("selection on val (lowest flip rate among eligible; tie-break val accuracy):")
        for t in selection["table"]:
            print(f"  {t['row']:24s} flips {t['flips']:.2f}%  acc {t['acc']:.1f}%  max/min {t['min_ratio']:.2f}"
                  f"{'' if t['eligible'] else '  (not eligible)'}")
        print(f"choice: {selection['choice']} (code default: FAIR[{DEFAULT_PRIOR}])")
    if a.stage == "select":
        return 0
    test = {(m, r, s): v for (m, r, s, sp), v in done.items() if sp == "test"}
    if selection is None and (out / "selection.json").is_file():
        selection = json.loads((out / "selection.json").read_text())
    write_report(runner, test, [k[:3] for k in missing if k[3] == "test"], Path(a.report),
                 time.perf_counter() - t0, "--quick" if a.quick else "full", selection)
    print(f"wrote {a.report} ({len(test)} runs, {len(missing)} not run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
