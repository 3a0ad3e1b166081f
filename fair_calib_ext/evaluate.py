"""Evaluate a diffusion LM and its quantized versions: ``python -m fair_calib_ext.evaluate``.

    python -m fair_calib_ext.evaluate --model tiny-llada --quantized runs/q_fair runs/q_rtn \\
        --tasks suite ppl metrics --n 50 --seed 0 --out runs/eval

writes ``results.json``, ``results.md`` (also printed) and PNG plots (stability-lag CCDF, flip
rate per step decile, step-wise probability MSE aligned to the first false commit, the position
prior of each quantized dir that has one) to ``--out``.
Under ``torchrun --nproc-per-node N -m fair_calib_ext.evaluate ...`` the samples are sharded
across ranks (gloo on CPU, NCCL on CUDA) and rank 0 writes the outputs; spell ``--n`` as
``--n-per-task`` there (torchrun's parser takes ``--n`` for one of its own options).
Errors in the arguments or inputs (checked before any model runs) print one line and exit with
code 2; ``--out`` must be absent or empty unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from fair_calib_ext.errors import UsageError, report

__all__ = ["main", "build_parser"]

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _flags() -> tuple[Any, ...]:
    """One rule per numeric flag; upper bounds where time or memory grows with the value."""
    from fair_calib_ext.cli_common import SAMPLER_FLAGS, THREADS_FLAG
    from fair_calib_ext.validate import Flag

    return (Flag("n", lo=1, hi=10_000), Flag("n_ppl", lo=1, hi=10_000), Flag("n_metrics", lo=1, hi=10_000),
            Flag("mc_num", lo=1, hi=4096), Flag("batch_size", lo=1, hi=4096),
            Flag("seed", lo=0, hi=10**6 - 1),  # the task suite's split streams stay disjoint below 10**6
            THREADS_FLAG, *SAMPLER_FLAGS)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = argparse.ArgumentParser(prog="python -m fair_calib_ext.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="full-precision model: HF dir or embedded name (tiny-llada, tiny-dream)")
    p.add_argument("--quantized", nargs="*", default=[], metavar="DIR", help="save_quantized dirs to compare")
    p.add_argument("--labels", nargs="*", default=None, help="row labels for --quantized (default: dir names)")
    p.add_argument("--tasks", nargs="+", default=["suite", "ppl", "metrics"],
                   help="task names (add sub mul sort reverse word), 'suite' (all six), 'ppl', 'metrics'")
    # --n-per-task is the same option; use it under torchrun, whose own parser rejects "--n" as an
    # ambiguous abbreviation of --nnodes / --nproc-per-node even after "-m module"
    p.add_argument("--n", "--n-per-task", dest="n", type=int, default=50,
                   help="examples per task (and texts for ppl unless --n-ppl)")
    p.add_argument("--n-ppl", type=int, default=None, help="held-out texts for perplexity")
    p.add_argument("--n-metrics", type=int, default=32, help="prompts for the mechanism metrics (§6: 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mc-num", type=int, default=128, help="Monte-Carlo samples of the ELBO")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--gen-length", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--block-length", type=int, default=None)
    p.add_argument("--remasking", default=None, help="sampler remasking rule (default per family)")
    p.add_argument("--cache", default=None, choices=("none", "prefix", "dual"),
                   help="Fast-dLLM approximate KV cache for the task decoding (default none; needs block-wise "
                        "decoding: Dream models need --block-length); not with the 'metrics' task")
    p.add_argument("--threshold", type=float, default=None, metavar="T",
                   help="Fast-dLLM parallel decoding: commit every masked position of the block with "
                        "confidence >= T (0 < T <= 1), at least one per step")
    p.add_argument("--prompt-bos", action="store_true", help="prepend the tokenizer's BOS to task prompts")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--out", required=True, help="output directory (absent or empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out, replacing earlier results")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's)")
    return p


def _check_args(a: argparse.Namespace) -> None:
    """Everything that can be checked before loading a model: flags, inputs, outputs, sampler."""
    from fair_calib_ext.cli_common import check_out_dir, check_same_architecture, require_quantized, resolve_device
    from fair_calib_ext.eval.runner import expand_tasks
    from fair_calib_ext.eval.tasks import GEN_LENGTH
    from fair_calib_ext.models import load_generation_config, resolve_model_path
    from fair_calib_ext.sampling.settings import resolve_sampler_settings
    from fair_calib_ext.validate import check_flags

    check_flags(a, _flags())
    try:
        _, _, want_metrics = expand_tasks(a.tasks)
    except ValueError as exc:  # expand_tasks names the unknown task and the valid ones
        raise UsageError(f"--tasks: {exc}") from None
    if a.labels is not None and len(a.labels) != len(a.quantized):
        raise UsageError(f"--labels has {len(a.labels)} names for {len(a.quantized)} --quantized dirs")
    _check_labels(a.labels or [Path(d).name for d in a.quantized])
    if a.device is not None:
        resolve_device(a.device)
    resolve_model_path(a.model)
    for d in a.quantized:
        if not Path(d).is_dir():
            raise UsageError(f"--quantized {d}: no such directory")
        require_quantized(d)
        check_same_architecture(a.model, d)  # flips against another model's teacher would mean nothing
    # the same validation as `sample` (one shared resolver): nothing is silently replaced
    st = resolve_sampler_settings(gen_length=a.gen_length, steps=a.steps, block_length=a.block_length,
                                  remasking=a.remasking, generation_config=load_generation_config(a.model),
                                  default_gen_length=GEN_LENGTH, cache=a.cache, threshold=a.threshold,
                                  family=_family(a.model))
    if st.fast and want_metrics:
        raise UsageError("--cache/--threshold apply to the task decoding; the 'metrics' task compares models "
                         "one full forward per step: pass --tasks without metrics (e.g. --tasks suite ppl)")
    check_out_dir(a.out, overwrite=a.overwrite)


def _family(model: str) -> str | None:
    """The model family from config.json ("dream" / "llada"), None when it cannot be read here."""
    from fair_calib_ext.models import read_config, resolve_model_path

    try:
        mt = str(read_config(resolve_model_path(model)).get("model_type", "")).lower()
    except (OSError, ValueError):
        return None
    return {"dream": "dream", "llada": "llada"}.get(mt)


def _check_labels(labels: list[str]) -> None:
    """Row labels name the plot files (``prior_<label>.png`` in --out): each must be a plain,
    unique file-name part, or a plot would land outside --out or overwrite another's."""
    seen: set[str] = set()
    for lb in labels:
        if not lb or lb in (".", "..") or "/" in lb or "\\" in lb or "\0" in lb or lb == "FP":
            raise UsageError(f"--labels {lb!r}: a row label must be a non-empty name without path separators "
                             "(and not 'FP', the full-precision row)")
        if lb in seen:
            raise UsageError(f"--labels {lb!r} is given twice (pass --labels to name the --quantized dirs apart)")
        seen.add(lb)


def _find_prior(qdir: str) -> list[float] | None:
    """Position prior weights stored next to a quantized checkpoint, if any."""
    try:
        from fair_calib_ext.calib.prior import PositionPrior  # calibration helper's format
    except ImportError:
        PositionPrior = None  # noqa: N806
    d = Path(qdir)
    if PositionPrior is not None and hasattr(PositionPrior, "load"):
        for stem in ("prior", "position_prior"):
            if (d / f"{stem}.safetensors").is_file() or (d / f"{stem}.json").is_file():
                try:
                    pr = PositionPrior.load(d / stem)
                except Exception:  # noqa: BLE001 - a prior is an optional extra for the plot
                    continue
                w = getattr(pr, "weights", None)
                if w is not None:
                    return [float(x) for x in w]
    return None


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Evaluate everything the arguments ask for; returns the results dict (rank 0 writes it)."""
    import torch

    from fair_calib_ext.eval.accuracy import default_gen_kwargs
    from fair_calib_ext.eval.distributed import close_distributed, init_distributed
    from fair_calib_ext.eval.report import default_columns, markdown_table
    from fair_calib_ext.eval.runner import evaluate_model, expand_tasks
    from fair_calib_ext.models import load_generation_config, load_pretrained, load_tokenizer
    from fair_calib_ext.quant.modules import kernel_path, kernel_report

    suite, want_ppl, want_metrics = expand_tasks(a.tasks)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    ctx = init_distributed(a.device)
    try:
        dtype = getattr(torch, DTYPES[a.dtype])
        progress = not a.no_progress and ctx.is_main
        teacher = load_pretrained(a.model, dtype=dtype, device=ctx.device)
        tok = load_tokenizer(a.model)
        gen = default_gen_kwargs(teacher, gen_length=a.gen_length, steps=a.steps, block_length=a.block_length,
                                 remasking=a.remasking, generation_config=load_generation_config(a.model),
                                 cache=a.cache, threshold=a.threshold)
        prefix = [tok.bos_token_id] if a.prompt_bos and tok.bos_token_id is not None else []
        common = dict(tasks=suite, want_ppl=want_ppl, want_metrics=want_metrics, n=a.n, n_ppl=a.n_ppl,
                      n_metrics=a.n_metrics, seed=a.seed, mc_num=a.mc_num, batch_size=a.batch_size,
                      gen_kwargs=gen, prompt_prefix=prefix, ctx=ctx, progress=progress)
        labels = a.labels or [Path(d).name for d in a.quantized]
        rows: list[dict[str, Any]] = []
        res = evaluate_model(teacher, tok, **common)
        rows.append({"label": "FP", "path": a.model, **res})
        for d, label in zip(a.quantized, labels):
            q = load_pretrained(d, dtype=dtype, device=ctx.device)
            res = evaluate_model(q, tok, teacher=teacher, **common)
            rows.append({"label": label, "path": d, "kernel_path": kernel_path(q), **res})
            del q
        results = {
            "config": {k: v for k, v in vars(a).items()},
            "gen_kwargs": gen,
            "world_size": ctx.world_size,
            "device": str(ctx.device),
            "torch": torch.__version__,
            "kernels": kernel_report(),  # int4 kernels or the fake-quant reference (per row: kernel_path)
            "models": rows,
        }
        if ctx.is_main:
            cols = default_columns(suite, want_ppl, want_metrics)
            table = markdown_table([(r["label"], [r]) for r in rows], cols)
            _write_outputs(a.out, results, table, want_metrics)
            print(table)
        return results
    finally:
        close_distributed(ctx)


def _write_outputs(out_dir: str, results: dict[str, Any], table: str, want_metrics: bool) -> None:
    from fair_calib_ext.eval.plots import plot_flips_by_decile, plot_lag_ccdf, plot_prior, plot_step_mse_aligned

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = results["gen_kwargs"]
    header = (f"gen_length {g['gen_length']}, steps {g['steps']}, block {g['block_length']}, "
              f"remasking {g['remasking']}, T = {g['temperature']}, mc_num {results['config']['mc_num']}, "
              f"seed {results['config']['seed']}"
              + (f", cache {g['cache'] or 'none'}, threshold {g['threshold']}" if "cache" in g else "") + "\n\n")
    (out / "results.md").write_text(header + table + "\n")
    plots = []
    rows = results["models"]
    if want_metrics:
        curves = [(r["label"], r["metrics"]["lag"]["ccdf"]) for r in rows if "metrics" in r]
        plots.append(plot_lag_ccdf(curves, out / "lag_ccdf.png"))
        series = [(r["label"], r["metrics"]["flips"]["by_step_decile"]) for r in rows[1:] if "metrics" in r]
        if series:
            plots.append(plot_flips_by_decile(series, out / "flips_by_decile.png"))
        aligned = [(r["label"], r["metrics"]["step_mse"]["aligned_to_first_false_commit"]) for r in rows[1:]
                   if "step_mse" in r.get("metrics", {})]
        if aligned:
            plots.append(plot_step_mse_aligned(aligned, out / "step_mse_aligned.png"))
    for r in rows[1:]:
        w = _find_prior(r["path"])
        if w is not None:
            plots.append(plot_prior(w, out / f"prior_{r['label']}.png", title=f"position prior ({r['label']})"))
    results["plots"] = plots
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    os.replace(tmp, out / "results.json")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = build_parser()
    a = parser.parse_args(argv)

    def body() -> int:
        _check_args(a)
        run(a)
        return 0

    return report(body)  # only user errors become one line; internal errors keep their traceback


if __name__ == "__main__":
    sys.exit(main())
