#!/usr/bin/env python
"""Accuracy under fast decoding (Fast-dLLM cache + threshold) on the embedded tiny models, W4A4.

Issue 22, item 5. For each model and calibration seed, the rows FP, RTN, FlatQuant, FAIR-Calib
(and, when the library can probe with a fast decoder, "FAIR dec-matched": FAIR-Calib's prior
probed with the dual-cache / threshold-0.9 decoder instead of the default one) are calibrated
with REPORT.md's recipe (``python/reproduce.py``'s ``row_spec`` and its FULL ``Scale``: 64 x 64
calibration tokens, 15 epochs per block, batch 4, 512 noise-probe rollouts) and then decode the
same test prompts with each decoder:

- ``default``: the family's default, one token per step (LLaDA: one block of 12, low-confidence;
  Dream: its timestep schedule, entropy), batched as in REPORT.md;
- ``dual+T0.9``: Fast-dLLM dual KV cache, blocks of 4, threshold 0.9 (batch 1, as Fast-dLLM);
- ``prefix``: Fast-dLLM prefix KV cache, blocks of 4, fixed steps (12: one token per step);
- ``block4`` (LLaDA only, a control): blocks of 4, no cache, one token per step: separates the
  block-wise (semi-autoregressive) schedule from the cache. Dream's block sampler is only
  reachable with a cache or a threshold, so Dream has no such control.

The block length 4 (3 blocks of the 12-token answer) was fixed before any run, by analogy with
Fast-dLLM's gen 256 / block 32; nothing was chosen on the test split.

Recorded per (model, row, seed, decoder): per-prompt exact match, prediction and forward passes
(NFE, ``sampling.DecodeStats``); per (model, row, seed) the default decoder's frontier flip rate
(``eval.runner`` mechanism metrics, teacher-forced on the FP trajectory: they exist only for the
default decoder). Every finished piece is cached as JSON under ``--out`` (resumable);
``--report`` writes the markdown tables (paired bootstrap CIs, ``eval.stats``) from the cache.

    python python/report_fast_decoding.py --threads 1 --out /tmp/fd_report/runs --n 300 --seeds 0 1
    python python/report_fast_decoding.py --out /tmp/fd_report/runs --report-only --md /tmp/fd_report/section.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from fair_calib_ext.calib import PRIOR_PRESETS, MethodConfig, calibrate, probe_stats  # noqa: E402
from fair_calib_ext.eval.accuracy import (  # noqa: E402
    _pad_id,
    decode_generation,
    default_gen_kwargs,
    encode_prompts,
    length_buckets,
    pad_batch,
    score_predictions,
    task_examples,
)
from fair_calib_ext.eval.runner import evaluate_model  # noqa: E402
from fair_calib_ext.eval.stats import paired_diff_mean, paired_diff_ratio  # noqa: E402
from fair_calib_ext.eval.tasks import TASKS  # noqa: E402
from fair_calib_ext.models import load_pretrained, load_tokenizer  # noqa: E402
from fair_calib_ext.sampling import DecodeStats, generate  # noqa: E402

import reproduce as rp  # noqa: E402  (python/reproduce.py: REPORT.md's rows and recipe)

BLOCK = 4
FAST = {"dual+T0.9": dict(block_length=BLOCK, cache="dual", threshold=0.9),
        "prefix": dict(block_length=BLOCK, cache="prefix")}
# FP only, for the target check: with a cache a block costs >= 2 forwards (refresh + one window
# step), so 3 blocks of 4 cannot go below 6 of the default's 12; one block (LLaDA's default block)
# shows what the threshold itself saves
TARGET_ONE_BLOCK = "dual+T0.9 B12"
MATCHED = "FAIR dec-matched"  # FAIR-Calib's prior probed with the dual+T0.9 decoder
MATCHED_DECODER = "dual+T0.9"
ROWS = ("FP", "RTN", "FlatQuant", "FAIR-Calib", MATCHED)
SEED_FREE = ("FP", "RTN")


def decoders(family: str, row: str = "") -> list[str]:
    return (["default", "dual+T0.9", "prefix"] + (["block4"] if family != "dream" else [])
            + ([TARGET_ONE_BLOCK] if row == "FP" else []))


def gen_kwargs(model: Any, dec: str) -> dict[str, Any]:
    gc = getattr(model, "generation_config", {})
    if dec == "default":
        return default_gen_kwargs(model, generation_config=gc)
    if dec == "block4":
        return default_gen_kwargs(model, block_length=BLOCK, generation_config=gc)
    if dec == TARGET_ONE_BLOCK:
        g = default_gen_kwargs(model, generation_config=gc)["gen_length"]
        return default_gen_kwargs(model, generation_config=gc, block_length=g, cache="dual", threshold=0.9)
    return default_gen_kwargs(model, generation_config=gc, **FAST[dec])


def matched_probe_available() -> bool:
    import inspect

    return "decoder" in inspect.signature(probe_stats).parameters


# ------------------------------------------------------------------------------------------
# runs


class Grid:
    def __init__(self, out: Path, n: int, n_metrics: int, batch_size: int, progress: bool) -> None:
        self.out, self.n, self.n_metrics, self.bs, self.progress = out, n, n_metrics, batch_size, progress
        self.scale = rp.FULL
        self._teacher: dict[str, tuple[Any, Any]] = {}

    def teacher(self, model: str) -> tuple[Any, Any]:
        if model not in self._teacher:
            self._teacher[model] = (load_pretrained(model), load_tokenizer(model))
        return self._teacher[model]

    def path(self, model: str, row: str, seed: int) -> Path:
        return self.out / model / rp._slug(row) / f"seed{seed}.json"

    def load(self, model: str, row: str, seed: int) -> dict[str, Any] | None:
        p = self.path(model, row, seed)
        return json.loads(p.read_text()) if p.is_file() else None

    def save(self, res: dict[str, Any]) -> None:
        p = self.path(res["model"], res["row"], res["seed"])
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, default=float))
        os.replace(tmp, p)

    def quantize(self, model: str, row: str, seed: int) -> tuple[Any, dict[str, Any]]:
        """The calibrated W4A4 model of ``row`` (reproduce.py's recipe) and its run info."""
        sc = self.scale
        teacher, tok = self.teacher(model)
        k = default_gen_kwargs(teacher, generation_config=teacher.generation_config)["gen_length"]
        info: dict[str, Any] = {}
        kw, data_kind, preset = rp.row_spec("FAIR-Calib" if row == MATCHED else row)
        torch.manual_seed(seed)
        cfg = MethodConfig(**kw, seed=seed, epochs=sc.epochs, batch_size=sc.calib_batch)
        prior = None
        if preset is not None:
            spec = PRIOR_PRESETS[preset]
            extra = {}
            if row == MATCHED:
                dk = gen_kwargs(teacher, MATCHED_DECODER)
                extra = {"decoder": {k_: dk[k_] for k_ in ("block_length", "cache", "threshold")}}
            t0 = time.perf_counter()
            st = probe_stats(teacher, rp.probe_prompts(tok, sc.n_probe, seed), policy=spec.policy, n_probe=sc.n_probe,
                             gen_length=k, block_length=sc.probe_block, batch_size=sc.probe_batch, seed=seed,
                             progress=False, **extra)
            prior = st.prior(spec)
            info["probe_time_s"] = time.perf_counter() - t0
            info["prior"] = {"weights": prior.weights.tolist(), "preset": preset, **extra}
        data = (rp.aligned_samples(tok, sc.n_calib, sc.seqlen, seed, k) if data_kind == "aligned"
                else rp.stream_windows(tok, sc.n_calib, sc.seqlen, seed))
        qm = load_pretrained(model)
        t0 = time.perf_counter()
        calibrate(qm, cfg, data, prior, progress=False)
        info["calib_time_s"] = time.perf_counter() - t0
        info["method_config"] = cfg.to_dict()
        return qm.eval(), info

    @torch.no_grad()
    def decode(self, m: Any, tok: Any, dec: str) -> dict[str, Any]:
        """Per-prompt correctness, prediction and NFE of the test prompts (n per task)."""
        gk = gen_kwargs(m, dec)
        ex = task_examples(list(TASKS), self.n, 0, split="test")
        ids = encode_prompts(tok, [e.prompt for e in ex])
        fast = "cache" in gk
        bs = 1 if fast else self.bs  # fast decoding is batch 1 (Fast-dLLM); generate would go row by row anyway
        preds, nfe = [""] * len(ids), [0] * len(ids)
        pad, eos = _pad_id(m, tok), tok.eos_token_id
        t0 = time.perf_counter()
        for idx in length_buckets(ids, bs):
            x, mask = pad_batch([ids[i] for i in idx], pad, "cpu")
            st = DecodeStats()
            out = generate(m, x, attention_mask=mask, stats=st, **gk)[:, x.shape[1]:]
            for j, i in enumerate(idx):
                preds[i] = decode_generation(tok, out[j].tolist(), eos)
                # fast: one prompt per call; batched (default): every row goes through each forward
                nfe[i] = st.nfe
        correct = score_predictions(ex, preds)
        return {"gen_kwargs": gk, "correct": "".join("1" if c else "0" for c in correct), "pred": preds, "nfe": nfe,
                "time_s": time.perf_counter() - t0}

    def run(self, model: str, row: str, seed: int) -> dict[str, Any]:
        res = self.load(model, row, seed)
        teacher, tok = self.teacher(model)
        decs = decoders(teacher.config.family, row)
        if res is not None and all(d in res["decoders"] for d in decs) and "flips" in res:
            return res
        t0 = time.perf_counter()
        if row == "FP":
            m, info = teacher, {}
        else:
            m, info = self.quantize(model, row, seed)
        res = res or {"model": model, "row": row, "seed": seed, "n_per_task": self.n, "decoders": {}, **info}
        for d in decs:
            if d not in res["decoders"]:
                res["decoders"][d] = self.decode(m, tok, d)
                print(f"  {model} {row} s{seed} {d}: acc {res['decoders'][d]['correct'].count('1') / len(res['decoders'][d]['correct']):.3f} "
                      f"nfe {sum(res['decoders'][d]['nfe']) / len(res['decoders'][d]['nfe']):.2f} "
                      f"{res['decoders'][d]['time_s']:.0f}s", flush=True)
        if "flips" not in res:
            gk = gen_kwargs(teacher, "default")
            ev = evaluate_model(m, tok, teacher=teacher, want_metrics=True, n_metrics=self.n_metrics, seed=0,
                                split="test", batch_size=self.bs, gen_kwargs=gk)
            fl = ev["metrics"]["flips"]
            res["flips"] = {"rate": fl["rate"], "per_prompt": fl["per_prompt"]}
        res["run_time_s"] = res.get("run_time_s", 0.0) + time.perf_counter() - t0
        self.save(res)
        return res


# ------------------------------------------------------------------------------------------
# report


def _grid(runs: list[dict[str, Any]], dec: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in r["decoders"][dec]["correct"]] for r in sorted(runs, key=lambda r: r["seed"])],
                        dtype=torch.float64)


def _disagree(runs: list[dict[str, Any]], fp: dict[str, Any], dec: str) -> torch.Tensor:
    ref = fp["decoders"][dec]["pred"]
    return torch.tensor([[p != q for p, q in zip(r["decoders"][dec]["pred"], ref)]
                         for r in sorted(runs, key=lambda r: r["seed"])], dtype=torch.float64)


def _ci(d: Any, scale: float = 100.0, digits: int = 2) -> str:
    return (f"{scale * d.diff:+.{digits}f} [{scale * d.lo:+.{digits}f}, {scale * d.hi:+.{digits}f}]"
            + (" *" if d.significant else ""))


def _common(ra: list[dict[str, Any]], rb: list[dict[str, Any]]) -> tuple[list, list]:
    sa, sb = {r["seed"] for r in ra}, {r["seed"] for r in rb}
    if len(sa) > 1 and len(sb) > 1:
        c = sa & sb
        ra, rb = [r for r in ra if r["seed"] in c], [r for r in rb if r["seed"] in c]
    return ra, rb


def report(out: Path, n_boot: int = 2000) -> str:
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in sorted(out.glob("*/*/seed*.json")):
        r = json.loads(p.read_text())
        runs.setdefault((r["model"], r["row"]), []).append(r)
    models = sorted({m for m, _ in runs}, key=lambda m: ["tiny-llada", "tiny-dream"].index(m) if m in ("tiny-llada", "tiny-dream") else 9)
    lines: list[str] = []
    for model in models:
        fam_decs = [d for d in ("default", "dual+T0.9", "prefix", "block4")
                    if any(d in r["decoders"] for rr in runs.values() for r in rr if r["model"] == model)]
        rows = [r for r in ROWS if (model, r) in runs]
        fp = runs.get((model, "FP"), [None])[0]
        lines += [f"### {model}", ""]
        # main table
        hdr = "| row | seeds | " + " | ".join(f"{d}: acc % | {d}: ≠FP % | {d}: NFE" for d in fam_decs) + " | flip % (default) |"
        lines += [hdr, "|---|---|" + "---:|" * (3 * len(fam_decs) + 1)]
        for row in rows:
            rr = runs[(model, row)]
            cells = []
            for d in fam_decs:
                have = [r for r in rr if d in r["decoders"]]
                if not have:
                    cells += ["—"] * 3
                    continue
                g = _grid(have, d)
                accs = (100 * g.mean(1)).tolist()
                acc = f"{sum(accs) / len(accs):.1f}" + (f" ± {torch.tensor(accs).std().item():.1f}" if len(accs) > 1 else "")
                dis = f"{100 * _disagree(have, fp, d).mean().item():.1f}" if fp and d in fp["decoders"] else "n/a"
                nfe = sum(sum(r["decoders"][d]["nfe"]) for r in have) / sum(len(r["decoders"][d]["nfe"]) for r in have)
                cells += [acc, dis, f"{nfe:.2f}"]
            fl = [r["flips"] for r in rr if "flips" in r]
            flc = (f"{100 * sum(sum(p[0] for p in f['per_prompt']) for f in fl) / max(1, sum(sum(p[1] for p in f['per_prompt']) for f in fl)):.2f}"
                   if fl else "—")
            lines.append(f"| {row} | {','.join(str(r['seed']) for r in sorted(rr, key=lambda r: r['seed']))} | "
                         + " | ".join(cells) + f" | {flc} |")
        lines.append("")
        # paired: each fast decoder vs default, per row; and the W4A4 − FP interaction
        lines += ["| row | decoder − default | Δ acc, points [95% CI] | MDE | (row − FP) Δ of Δ acc [95% CI] | NFE ratio | seeds × prompts |",
                  "|---|---|---|---|---|---|---|"]
        for row in rows:
            rr = runs[(model, row)]
            for d in fam_decs[1:]:
                have = [r for r in rr if d in r["decoders"] and "default" in r["decoders"]]
                if not have:
                    continue
                a, b = _grid(have, d), _grid(have, "default")
                pdm = paired_diff_mean(a, b, n_boot=n_boot)
                inter = "—"
                if row != "FP" and fp and d in fp["decoders"]:
                    dd = paired_diff_mean(a - b, _grid([fp], d) - _grid([fp], "default"), n_boot=n_boot)
                    inter = _ci(dd)
                nfe = (sum(sum(r["decoders"][d]["nfe"]) for r in have) / sum(sum(r["decoders"]["default"]["nfe"]) for r in have))
                lines.append(f"| {row} | {d} − default | {_ci(pdm)} | {100 * pdm.mde:.2f} | {inter} | {nfe:.3f} | "
                             f"{pdm.n_seeds} × {pdm.n_prompts} |")
        lines.append("")
        # paired: methods under each decoder
        pairs = [("FAIR-Calib", "FlatQuant"), (MATCHED, "FlatQuant"), (MATCHED, "FAIR-Calib")]
        lines += ["| A − B | decoder | acc A / B % | Δ acc, points [95% CI] | MDE | ≠FP A / B % | Δ ≠FP, points [95% CI] | seeds × prompts |",
                  "|---|---|---|---|---|---|---|---|"]
        for a_, b_ in pairs:
            if (model, a_) not in runs or (model, b_) not in runs:
                continue
            for d in fam_decs:
                ra = [r for r in runs[(model, a_)] if d in r["decoders"]]
                rb = [r for r in runs[(model, b_)] if d in r["decoders"]]
                ra, rb = _common(ra, rb)
                if not ra or not rb:
                    continue
                ga, gb = _grid(ra, d), _grid(rb, d)
                pdm = paired_diff_mean(ga, gb, n_boot=n_boot)
                dis = "n/a | n/a"
                if fp and d in fp["decoders"]:
                    da, db = _disagree(ra, fp, d), _disagree(rb, fp, d)
                    pd2 = paired_diff_mean(da, db, n_boot=n_boot)
                    dis = f"{100 * da.mean():.1f} / {100 * db.mean():.1f} | {_ci(pd2)}"
                lines.append(f"| {a_} − {b_} | {d} | {100 * ga.mean():.1f} / {100 * gb.mean():.1f} | {_ci(pdm)} | "
                             f"{100 * pdm.mde:.2f} | {dis} | {pdm.n_seeds} × {pdm.n_prompts} |")
            if d == fam_decs[-1]:
                ra, rb = _common([r for r in runs[(model, a_)] if "flips" in r], [r for r in runs[(model, b_)] if "flips" in r])
                if ra and rb:
                    def fg(rs):
                        t = torch.tensor([r["flips"]["per_prompt"] for r in sorted(rs, key=lambda r: r["seed"])], dtype=torch.float64)
                        return t[..., 0], t[..., 1]
                    (fa, ca), (fb, cb) = fg(ra), fg(rb)
                    pr = paired_diff_ratio(fa, ca, fb, cb, n_boot=n_boot)
                    lines.append(f"| {a_} − {b_} | default: frontier flips | {100 * fa.sum() / ca.sum():.2f} / "
                                 f"{100 * fb.sum() / cb.sum():.2f} % | {_ci(pr)} (flip points) | {100 * pr.mde:.2f} | "
                                 f"relative {100 * (pr.rel or 0):+.0f}% [{100 * (pr.rel_lo or 0):+.0f}%, {100 * (pr.rel_hi or 0):+.0f}%] | — | "
                                 f"{pr.n_seeds} × {pr.n_prompts} |")
        lines.append("")
        # the target check
        for dec, what in (("dual+T0.9", f"blocks of {BLOCK}"), (TARGET_ONE_BLOCK, "one block of 12")):
            if not fp or dec not in fp["decoders"]:
                continue
            a, b = _grid([fp], dec), _grid([fp], "default")
            pdm = paired_diff_mean(a, b, n_boot=n_boot)
            na, nb = fp["decoders"][dec]["nfe"], fp["decoders"]["default"]["nfe"]
            r = sum(na) / sum(nb)
            half = sum(x <= 0.5 * y for x, y in zip(na, nb)) / len(na)
            lines.append(f"- Target ({model}, FP, dual cache + threshold 0.9, {what}): {sum(na) / len(na):.2f} vs "
                         f"{sum(nb) / len(nb):.2f} forward passes per answer = {r:.3f}× the default decoder's "
                         f"({100 * half:.0f}% of answers at ≤ half): **{'met' if r <= 0.5 else 'not met'}** (≤ 0.5×); "
                         f"FP accuracy {100 * a.mean():.1f}% vs {100 * b.mean():.1f}%, change {_ci(pdm)} points "
                         f"(1 × {a.shape[1]} prompts).")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny-llada", "tiny-dream"])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--n", type=int, default=300, help="test prompts per task (REPORT.md: 300)")
    ap.add_argument("--n-metrics", type=int, default=512, help="prompts of the default decoder's flip rate")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="runs/fast_decoding")
    ap.add_argument("--md", default=None, help="write the tables here")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--deadline-min", type=float, default=None, help="start no run after this many minutes")
    ap.add_argument("--n-boot", type=int, default=2000)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    if not a.report_only:
        g = Grid(out, a.n, a.n_metrics, a.batch_size, progress=False)
        t_start = time.perf_counter()
        plan = []
        for seed in a.seeds:  # seed-major: a deadline leaves whole seeds
            for model in a.models:
                for row in a.rows:
                    if row in SEED_FREE and seed != a.seeds[0]:
                        continue
                    if row == MATCHED and not matched_probe_available():
                        print(f"skip {row}: probe_stats has no decoder= argument", flush=True)
                        continue
                    plan.append((model, row, seed))
        for model, row, seed in plan:
            if a.deadline_min is not None and (time.perf_counter() - t_start) / 60 > a.deadline_min:
                print(f"deadline: not run {model} {row} seed {seed}", flush=True)
                continue
            t0 = time.perf_counter()
            g.run(model, row, seed)
            print(f"{model} {row} seed {seed}: {time.perf_counter() - t0:.0f}s "
                  f"(total {(time.perf_counter() - t_start) / 60:.1f} min)", flush=True)
    md = report(out, a.n_boot)
    if a.md:
        Path(a.md).write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
