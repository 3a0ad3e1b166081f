#!/usr/bin/env python
"""Reproduce the FAIR-Calib comparison on the embedded tiny models → REPORT.md + plots.

For each model (default tiny-llada and tiny-dream) and seed, at W4A4:
- rows (``MAIN_ROWS``): FP, RTN, SmoothQuant, QuaRot, QuaRot+GPTQ, FlatQuant (FP inputs, as
  FlatQuant's code), FAIR-Calib (quantized-prefix inputs, aligned (prompt, answer) samples and
  the Stage I prior of the default preset ``DEFAULT_PRIOR``);
- paired rows (``PAIRED_ROWS``, every seed, same samples and probe prompts): FAIR with a uniform
  prior, the old default (stream windows + flat prior), FAIR[literal] and FAIR[sampler]; the
  report gives the differences of ``PAIRS`` with bootstrap intervals;
- the default prior itself is chosen on the val split among ``CANDIDATES`` by
  :func:`select_default` (``--stage select``), before any test-split number of them exists;
- columns: per-task exact match, average, MC-ELBO perplexity, frontier flip rate, post-commit
  mismatch (+ mean-disagree / never-agree subsets), median and p90 stability lag, calibration
  time; mean ± std over seeds (the cheap baselines in ``SINGLE_SEED_ROWS`` run the first seed only).

Calibration data (Stage II, ``row_spec``): "stream" rows use the corpus' train-split task lines
joined by EOS and cut into ``seqlen``-token windows; "aligned" rows use (prompt, answer) samples
with the prior's position 0 on each answer's first token. Stage I probes the teacher with train-split task
prompts drawn with another seed (``probe_prompts``), in blocks of ``probe_block``, with the preset's
probe policy.
The seed changes the calibration samples, the probe prompts and the methods' own randomness;
evaluation sets are fixed (seed 0), so the std measures calibration variability.

Every finished (model, row, seed, split) is cached as JSON under ``--out``; re-running resumes,
and ``--deadline-min`` stops launching runs so the report is written from what finished (missing
runs are listed in the report).

    python python/reproduce.py --quick            # minutes: 2 seeds, fewer rows, small sets
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
from fair_calib_ext.eval.corpus import calib_texts, corpus_pairs  # noqa: E402
from fair_calib_ext.eval.plots import (  # noqa: E402
    plot_flips_by_decile,
    plot_flips_by_position,
    plot_lag_ccdf,
    plot_prior,
)
from fair_calib_ext.eval.report import Column, default_columns, markdown_table, mean_std  # noqa: E402
from fair_calib_ext.eval.runner import evaluate_model  # noqa: E402
from fair_calib_ext.eval.stats import paired_diff_mean, paired_diff_ratio  # noqa: E402
from fair_calib_ext.eval.tasks import TASKS  # noqa: E402
from fair_calib_ext.models import load_pretrained, load_tokenizer  # noqa: E402

MAIN_ROWS = ("FP", "RTN", "SmoothQuant", "QuaRot", "QuaRot+GPTQ", "FlatQuant", "FAIR-Calib")
# paired rows of the FAIR-Calib analysis: every seed, same calibration samples and probe prompts
PAIRED_ROWS = ("FAIR uniform", "FAIR old", "FAIR[literal]", "FAIR[sampler]")
# the candidates of the default prior, scored on the val split (see select_default)
CANDIDATES = ("FAIR uniform", "FAIR[balanced]", "FAIR[literal]", "FAIR[literal-0.03]", "FAIR[exp]",
              "FAIR[sampler]", "FAIR[sampler-frontier]", "FAIR[noise]")
# (A, B, what it isolates): the paired differences the report gives with bootstrap CIs
PAIRS = (("FAIR-Calib", "FlatQuant", "the method vs its baseline"),
         ("FAIR-Calib", "FAIR uniform", "the prior alone (same data, engine, inputs; w ≡ 1)"),
         ("FAIR-Calib", "FAIR[literal]", "sampler-matched noise-aware probe vs random-commit probe, same combine rule"),
         ("FAIR[sampler]", "FAIR[literal]", "sampler-matched margin probe vs random-commit probe, same combine rule"),
         ("FAIR-Calib", "FAIR old", "new default vs the old one (aligned data + prior vs stream + flat prior)"))
SINGLE_SEED_ROWS = ("FP", "RTN", "SmoothQuant", "QuaRot", "QuaRot+GPTQ")  # cheap baselines: first seed only


@dataclass
class Scale:
    """Everything that sets the size of a reproduction run."""

    models: list[str] = field(default_factory=lambda: ["tiny-llada", "tiny-dream"])
    seeds: list[int] = field(default_factory=lambda: list(range(10)))
    rows: list[str] = field(default_factory=lambda: list(MAIN_ROWS) + list(PAIRED_ROWS))
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
QUICK = Scale(seeds=[0, 1], rows=["FP", "RTN", "FlatQuant", "FAIR-Calib", "FAIR uniform"],
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
    """``n`` (prompt, answer) pairs of ``split``, the six tasks interleaved (``eval.corpus``)."""
    return corpus_pairs(split, n, seed)


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


def _by_seed(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(runs, key=lambda r: r["seed"])


def acc_grid(runs: list[dict[str, Any]]) -> torch.Tensor:
    """[seeds, prompts] 0/1 correctness of the test examples (all tasks, the suite's order)."""
    return torch.tensor([[c == "1" for c in r["tasks"]["correct"]] for r in _by_seed(runs)], dtype=torch.float64)


def flip_grids(runs: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """([seeds, prompts] flips, [seeds, prompts] commits) of the mechanism-metric prompts."""
    pp = [r["metrics"]["flips"]["per_prompt"] for r in _by_seed(runs)]
    t = torch.tensor(pp, dtype=torch.float64)  # [S, P, 2]
    return t[..., 0], t[..., 1]


def paired(res: dict[str, list[dict[str, Any]]], a: str, b: str, n_boot: int) -> dict[str, Any] | None:
    """Paired differences A − B over the seeds both have (a single-seed row pairs with every seed)."""
    ra, rb = res.get(a, []), res.get(b, [])
    if not ra or not rb:
        return None
    sa, sb = {r["seed"] for r in ra}, {r["seed"] for r in rb}
    common = sa & sb
    if len(sa) > 1 and len(sb) > 1:
        ra, rb = [r for r in ra if r["seed"] in common], [r for r in rb if r["seed"] in common]
    if not ra or not rb:
        return None
    acc = paired_diff_mean(acc_grid(ra), acc_grid(rb), n_boot=n_boot)
    fa, ca = flip_grids(ra)
    fb, cb = flip_grids(rb)
    flips = paired_diff_ratio(fa, ca, fb, cb, n_boot=n_boot)
    return {"a": a, "b": b, "acc": acc.to_dict(), "flips": flips.to_dict(),
            "acc_a": float(acc_grid(ra).mean()), "acc_b": float(acc_grid(rb).mean()),
            "flips_a": float(fa.sum() / ca.sum()), "flips_b": float(fb.sum() / cb.sum())}


def _ci(d: dict[str, Any], scale: float = 100.0, digits: int = 2) -> str:
    return (f"{scale * d['diff']:+.{digits}f} [{scale * d['lo']:+.{digits}f}, {scale * d['hi']:+.{digits}f}]"
            + (" *" if d["significant"] else ""))


def paired_table(rows: list[tuple[str, dict[str, Any], str]]) -> list[str]:
    out = ["| model | A − B | isolates | acc A / B % | Δ acc, points [95% CI] | MDE acc | flips A / B % | "
           "Δ flips, points [95% CI] | Δ flips, relative [95% CI] | seeds × prompts |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for model, p, what in rows:
        fl = p["flips"]
        rel = (f"{100 * fl['rel']:+.0f}% [{100 * fl['rel_lo']:+.0f}%, {100 * fl['rel_hi']:+.0f}%]"
               if fl["rel"] is not None else "n/a")
        out.append(f"| {model} | {p['a']} − {p['b']} | {what} | {100 * p['acc_a']:.1f} / {100 * p['acc_b']:.1f} | "
                   f"{_ci(p['acc'])} | {100 * p['acc']['mde']:.2f} | {100 * p['flips_a']:.2f} / "
                   f"{100 * p['flips_b']:.2f} | {_ci(fl)} | {rel} | {p['acc']['n_seeds']} × {p['acc']['n_prompts']} "
                   f"/ {fl['n_prompts']} |")
    return out


def targets(model: str, res: dict[str, list[dict[str, Any]]], p: dict[str, Any] | None) -> list[str]:
    """The issue's targets for FAIR-Calib vs FlatQuant, judged on the paired CIs."""
    if p is None:
        return [f"- {model}: FAIR-Calib or FlatQuant missing."]
    fp = _avg(res.get("FP", []), "tasks.avg", 100.0)[0]
    out = []
    fl, ac = p["flips"], p["acc"]
    cut = -fl["rel"] if fl["rel"] is not None else None
    if cut is not None:
        ok = fl["rel_hi"] <= -0.30
        out.append(f"- {model}: flips {100 * p['flips_a']:.2f}% vs {100 * p['flips_b']:.2f}% "
                   f"(relative change {100 * fl['rel']:+.0f}%, 95% CI {100 * fl['rel_lo']:+.0f}% to {100 * fl['rel_hi']:+.0f}%). "
                   f"Target ≥ 30% fewer with the CI excluding 0: **{'met' if ok and fl['significant'] else 'not met'}**.")
    if fp is not None:
        gap = fp - 100 * p["acc_b"]
        if gap > 0:
            closed = 100 * ac["diff"] / gap
            lo, hi = 100 * ac["lo"] / gap, 100 * ac["hi"] / gap
            out.append(f"- {model}: FlatQuant→FP gap {gap:.1f} points; FAIR-Calib closes {100 * closed:.0f}% of it "
                       f"(CI {100 * lo:.0f}% to {100 * hi:.0f}%). Target ≥ 50% with the CI excluding 0: "
                       f"**{'met' if closed >= 0.5 and ac['significant'] and ac['diff'] > 0 else 'not met'}**.")
        else:
            out.append(f"- {model}: no FlatQuant→FP gap to close (FP {fp:.1f}%, FlatQuant {100 * p['acc_b']:.1f}%).")
    if fl["rel"] is not None and fp is not None and fp - 100 * p["acc_b"] > 0:
        gap = fp - 100 * p["acc_b"]
        out.append(f"- {model}: excluded at 95%: a flip reduction larger than {max(0.0, -100 * fl['rel_lo']):.0f}%, "
                   f"and closing more than {max(0.0, 100 * 100 * ac['hi'] / gap):.0f}% of the FlatQuant→FP gap "
                   f"(an accuracy gain above {100 * ac['hi']:+.2f} points).")
    half_acc = 100 * (ac["hi"] - ac["lo"]) / 2
    half_rel = 100 * (fl["rel_hi"] - fl["rel_lo"]) / 2 if fl["rel"] is not None else float("nan")
    out.append(f"- {model}: resolution — accuracy CI half-width {half_acc:.2f} points (bar ≤ 1), relative-flip CI "
               f"half-width {half_rel:.0f}% (bar ≤ 10%); minimal detectable effect {100 * ac['mde']:.2f} accuracy "
               f"points, {100 * fl['mde']:.2f} flip points.")
    return out


def _pearson(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3:
        return None
    t = torch.tensor([x, y], dtype=torch.float64)
    t = t - t.mean(1, keepdim=True)
    den = float(t[0].norm() * t[1].norm())
    return float((t[0] * t[1]).sum()) / den if den > 0 else None


def diagnostics(model: str, res: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Where the flips are, where the priors point, where Stage II spent its error budget."""
    out: list[str] = []
    first = {r: _by_seed(v)[0] for r, v in res.items() if v}
    ref = first.get("FlatQuant")
    if ref and ref.get("metrics", {}).get("flips", {}).get("by_position"):
        prof = ref["metrics"]["flips"]["by_position"]
        ok = [i for i, v in enumerate(prof) if v is not None]
        out.append(f"- Where FlatQuant's flips are (seed {ref['seed']}, flip % by generation position): "
                   + ", ".join(f"{100 * prof[i]:.1f}" for i in ok) + ".")
        cors = []
        for r in ("FAIR-Calib", "FAIR old", "FAIR[literal]", "FAIR[sampler]"):
            pr = first.get(r, {}).get("prior")
            if pr and len(pr["weights"]) == len(prof):
                w = pr["weights"]
                c = _pearson([w[i] for i in ok], [prof[i] for i in ok])
                cors.append(f"{r} ({pr.get('preset')}: w {min(w):.2f}–{max(w):.2f}, max/min {max(w) / max(min(w), 1e-9):.1f}; "
                            f"r = {'n/a' if c is None else f'{c:+.2f}'})")
        if cors:
            out.append("- Priors (seed-first run) and their correlation with that flip profile: " + "; ".join(cors) + ".")
    kl = []
    for r in ("FlatQuant", "FAIR uniform", "FAIR-Calib", "FAIR old", "FAIR[sampler]"):
        win, oth = _avg(res.get(r, []), "visible_kl.window")[0], _avg(res.get(r, []), "visible_kl.outside")[0]
        if win is not None and oth is not None:
            kl.append(f"{r} {win:.4f} / {oth:.4f}")
    if kl:
        out.append("- Where Stage II spent its error budget — KL(FP ‖ model) on held-out aligned samples, continuation "
                   "window / elsewhere (mean over seeds): " + ", ".join(kl) + ".")
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
                 report: Path, wall_s: float, preset: str, selection: dict[str, Any] | None) -> None:
    sc = runner.scale
    plot_dir = report.parent / "report_plots"
    cols = default_columns(TASKS, True, True, with_calib_time=True)
    spec = PRIOR_PRESETS[DEFAULT_PRIOR]
    out: list[str] = ["# FAIR-Calib on the embedded tiny models (W4A4): paired comparison", ""]
    out.append(f"Generated by `python/reproduce.py` ({preset}) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
               f"{platform.machine()} CPU, {os.cpu_count()} cores (shared with other jobs), torch {torch.__version__}; "
               f"{len(done)} test runs, {sum(v.get('run_time_s', 0.0) for v in done.values()) / 60:.1f} min of run time "
               f"(this call: {wall_s / 60:.1f} min wall). Every number was measured by these runs; nothing is copied "
               "from the paper.")
    out += ["", "## Protocol", ""]
    out.append(f"- Models: {', '.join(f'{Path(m).name} (model.safetensors sha256 {_sha(m)})' for m in sc.models)}; "
               f"repository commit {_git_head()}.")
    out.append(f"- Paired design: seeds {sc.seeds}. A seed fixes the calibration samples, the probe prompts and the "
               "methods' own randomness, identically for every method; all methods are scored on the same test "
               f"prompts ({sc.n_eval} per task, {sc.n_eval * len(TASKS)} in all, exact match) and the same "
               f"{sc.n_metrics} mechanism-metric prompts (flips teacher-forced on the FP trajectory). "
               f"RTN/SmoothQuant/QuaRot/QuaRot+GPTQ ran with seed {sc.seeds[0]} only (cheap baselines; FP and RTN "
               "do not depend on the seed).")
    out.append(f"- Intervals: 95% percentile bootstrap of the paired difference ({sc.n_boot} replicates), resampling "
               "seeds and prompts together (the same draws for both methods). `*` = the CI excludes 0; only those "
               "differences are claimed. MDE = 2.8 × bootstrap SE: the smallest true difference this design finds "
               "80% of the time.")
    out.append(f"- Calibration: {sc.n_calib} sequences × {sc.seqlen} tokens from the train split; FlatQuant and FAIR "
               f"rows {sc.epochs} epochs per block, batch {sc.calib_batch}. FlatQuant = FP block inputs (its code), "
               "stream windows of task lines (WikiText-style), w ≡ 1. FAIR rows = quantized-prefix inputs; "
               "'aligned' data = (prompt, answer + EOS fill to K) samples packed per sequence, prior position 0 on "
               "each answer's first token, prompt positions at the floor (`calib.data`).")
    out.append(f"- FAIR-Calib = FAIR[{DEFAULT_PRIOR}]: {spec.policy} probe"
               + (f" (blocks of {sc.probe_block})" if spec.policy == "random" else " (the family's own sampler)")
               + f", {sc.n_probe} rollouts of train-split task prompts, K = generation length; mode {spec.mode}, "
               f"combine {spec.combine}, λ0 {spec.lambda0}"
               + (f" (rate {spec.lambda0_rate})" if spec.lambda0 == "exp" else "")
               + f", λ1 {spec.lambda1}, c̃ {spec.reliability}, floor {spec.floor}. "
               "FAIR uniform = the same data and engine with w ≡ 1. FAIR old = the previous CLI default (stream "
               "windows, trailing-K prior, balanced λ1 = 1, λ0 early: flat by construction; probed on the same "
               "task prompts as the other rows). FAIR[p] = preset p of "
               "`calib.prior.PRIOR_PRESETS` on aligned data.")
    if selection:
        out += ["", "## Choosing the default prior (val split only)", ""]
        out.append("The rule, fixed in `select_default` before any candidate was scored on the test split: "
                   "eligible = FAIR[preset] with prior max/min ≥ 1.5 on every model and seed; lowest mean val flip "
                   f"rate wins; within {SELECT_TIE} flip points, the higher val accuracy. Val = "
                   f"{sc.n_val} examples per task and {sc.n_val_metrics} metric prompts of the val split, seeds "
                   f"{sc.select_seeds}, both models.")
        out += ["", "| candidate | val flips % | val acc % | prior max/min | eligible |", "|---|---:|---:|---:|---|"]
        for t in selection["table"]:
            out.append(f"| {t['row']} | {t['flips']:.2f} | {t['acc']:.1f} | {t['min_ratio']:.2f} | "
                       f"{'yes' if t['eligible'] else 'no'} |")
        out += ["", f"Choice: **{selection['choice']}**; the code's default is FAIR[{DEFAULT_PRIOR}]."]
    else:
        out.append(f"- No val-split selection was run for these weights: FAIR-Calib uses the code's default prior "
                   f"FAIR[{DEFAULT_PRIOR}], which `select_default` chose on the val split of earlier weights "
                   "(`--stage select` repeats the choice for these).")
    if missing:
        out += ["", f"**Not run (time budget): {len(missing)} runs** — "
                + "; ".join(f"{Path(m).name}/{r}/seed{s}" for m, r, s in missing[:40])
                + (" ..." if len(missing) > 40 else "") + "."]
    per_model: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for (m, r, s), v in done.items():
        per_model.setdefault(m, {}).setdefault(r, []).append(v)
    rows, tgt = [], []
    for model in sc.models:
        res = per_model.get(model, {})
        for a, b, what in PAIRS:
            p = paired(res, a, b, sc.n_boot)
            if p is not None:
                rows.append((Path(model).name, p, what))
        tgt += targets(Path(model).name, res, paired(res, "FAIR-Calib", "FlatQuant", sc.n_boot))
    if rows:
        out += ["", "## Paired differences (test split)", ""]
        out += paired_table(rows)
        out += ["", "Targets (FAIR-Calib vs FlatQuant):", ""] + tgt
    for model in sc.models:
        name = Path(model).name
        res = per_model.get(model, {})
        if not res:
            continue
        out += ["", f"## {name}", "", "Mean ± sample std over seeds (single-seed rows without ±)."]
        out.append("")
        out.append(markdown_table([(r, res[r]) for r in sc.rows if r in res], cols, first_header="method"))
        out += [""] + diagnostics(name, res)
        first = {r: _by_seed(v)[0] for r, v in res.items()}
        imgs = []
        curves = [(r, first[r]["metrics"]["lag"]["ccdf"]) for r in ("FP", "RTN", "FlatQuant", "FAIR-Calib")
                  if r in first and "metrics" in first[r]]
        if curves:
            imgs.append(plot_lag_ccdf(curves, plot_dir / f"{name}_lag_ccdf.png", title=f"{name}: stability lag CCDF"))
        series = [(r, first[r]["metrics"]["flips"]["by_step_decile"]) for r in ("RTN", "FlatQuant", "FAIR uniform", "FAIR-Calib")
                  if r in first and "metrics" in first[r]]
        if series:
            imgs.append(plot_flips_by_decile(series, plot_dir / f"{name}_flips_by_decile.png",
                                             title=f"{name}: frontier flips by step decile"))
        pos = [(r, first[r]["metrics"]["flips"]["by_position"]) for r in ("RTN", "FlatQuant", "FAIR uniform", "FAIR-Calib")
               if r in first and first[r].get("metrics", {}).get("flips", {}).get("by_position")]
        pri = [(r, first[r]["prior"]["weights"]) for r in ("FAIR-Calib", "FAIR[sampler]", "FAIR[literal]")
               if r in first and "prior" in first[r]]
        if pos:
            imgs.append(plot_flips_by_position(pos, pri, plot_dir / f"{name}_flips_by_position.png",
                                               title=f"{name}: flips by position (seed {sc.seeds[0]}) and priors"))
        if "FAIR-Calib" in first and "prior" in first["FAIR-Calib"]:
            imgs.append(plot_prior(first["FAIR-Calib"]["prior"]["weights"], plot_dir / f"{name}_prior.png",
                                   title=f"{name}: FAIR-Calib prior (seed {first['FAIR-Calib']['seed']})"))
        if imgs:
            out += [""] + [f"![{Path(i).stem}]({os.path.relpath(i, report.parent)})" for i in imgs]
    report.write_text("\n".join(out) + "\n")


# ------------------------------------------------------------------------------------------


def _preset_label(base: Scale, scale: Scale, quick: bool) -> str:
    """The preset name plus every field the command line changed (so a reduced grid says so)."""
    diffs = [f"--{f.name.replace('_', '-')} {getattr(scale, f.name)}" for f in dataclasses.fields(Scale)
             if getattr(scale, f.name) != getattr(base, f.name)]
    return ("--quick" if quick else "full") + (f" with {', '.join(diffs)}" if diffs else "")


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
    for r in scale.rows + list(CANDIDATES):
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
    shas = {m: _sha(m) for m in scale.models}
    if selection is not None:
        selection["models"] = shas  # a selection belongs to these weights
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
        if selection.get("models") != shas:
            print(f"{out / 'selection.json'} was made for other weights; the report leaves it out", file=sys.stderr)
            selection = None
    write_report(runner, test, [k[:3] for k in missing if k[3] == "test"], Path(a.report),
                 time.perf_counter() - t0, _preset_label(base, scale, a.quick), selection)
    print(f"wrote {a.report} ({len(test)} runs, {len(missing)} not run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
