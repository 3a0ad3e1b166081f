"""Fast decoding (Fast-dLLM KV cache + confidence threshold): tokens/s and NFE, in one run.

For each model (default: the embedded tiny-llada and tiny-dream; ``--model DIR`` for any
checkpoint, a save_quantized dir included) it decodes the same prompts, one at a time (Fast-dLLM
is batch 1), with cache none / prefix / dual x threshold none / each ``--thresholds`` value,
and prints per configuration: median seconds for all prompts (min-max over ``--repeats``
interleaved rounds after a warmup round), tokens/s, mean NFE (forward passes) per prompt, the
ratios of both against the default decoder (cache none, no threshold) measured in the same run,
the share of generated tokens equal to the default decoder's, and, on the embedded task suite,
exact-match accuracy. ``--w4a4`` adds the same grid with every decoder-layer linear swapped for
W4A4Linear (bf16 elsewhere).

    PYTHONPATH=. python python/bench_fast_decoding.py --threads 1
    PYTHONPATH=. python python/bench_fast_decoding.py --model /ckpt/LLaDA-8B-Instruct --dtype bfloat16 \\
        --gen-length 256 --block-length 32 --n-per-task 1 --repeats 1 --warmup 0
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ops import cpu_name
from bench_sampling import to_w4a4, w4a4_available

from fair_calib_ext.eval.accuracy import encode_prompts, task_examples
from fair_calib_ext.eval.tasks import TASKS, score
from fair_calib_ext.models import available_embedded, load_pretrained, load_tokenizer
from fair_calib_ext.sampling import DecodeStats, generate


def _prompts(name: str, args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[Any] | None, Any]:
    """Task-suite prompts through the model's tokenizer, else random ids (no tokenizer)."""
    try:
        tok = load_tokenizer(name)
    except Exception:  # noqa: BLE001 - a checkpoint without a tokenizer gets random prompts
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(5, min(vocab, 1000), (args.n_per_task * len(TASKS), args.prompt_len), generator=g)
        return ids.tolist(), None, None
    examples = task_examples(TASKS, args.n_per_task, seed=0, split="test")
    return encode_prompts(tok, [ex.prompt for ex in examples]), examples, tok


def _run(model: torch.nn.Module, prompts: list[list[int]], gen_kw: dict[str, Any]) -> tuple[float, int, list[list[int]]]:
    """(seconds, total NFE, generated ids per prompt) for one pass over the prompts."""
    stats = DecodeStats()
    outs = []
    t0 = time.perf_counter()
    for p in prompts:
        out = generate(model, torch.tensor([p]), stats=stats, **gen_kw)
        outs.append(out[0, len(p):].tolist())
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, stats.nfe, outs


def bench(name: str, label: str, model: torch.nn.Module, args: argparse.Namespace) -> list[str]:
    cfg = model.config
    prompts, examples, tok = _prompts(name, args, cfg.vocab_size)
    steps = args.steps or args.gen_length
    rm = "entropy" if cfg.family == "dream" else "low_confidence"
    base = {"gen_length": args.gen_length, "steps": steps, "block_length": args.block_length, "remasking": rm}
    configs = [(c, t) for c in (None, "prefix", "dual") for t in (None, *args.thresholds)]
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    nfe: dict[tuple, int] = {}
    outs: dict[tuple, list[list[int]]] = {}
    with torch.no_grad():
        for rnd in range(args.warmup + args.repeats):  # interleaved rounds: load changes hit every config alike
            for c, t in configs:
                dt, n, o = _run(model, prompts, {**base, "cache": c, "threshold": t})
                nfe[(c, t)], outs[(c, t)] = n, o
                if rnd >= args.warmup:
                    times[(c, t)].append(dt)
    n_tok = len(prompts) * args.gen_length
    ref = (None, None)
    t_ref = statistics.median(times[ref])
    rows = [(f"{label}: {cfg.family}, d={cfg.hidden_size}, layers={cfg.num_hidden_layers}, "
             f"{len(prompts)} prompts (batch 1), gen {args.gen_length}, block {args.block_length}, steps {steps}, "
             f"remasking {rm}"), "",
            ("| cache | threshold | s, all prompts (min-max) | tokens/s | speedup | NFE / prompt | NFE ratio | "
             "same tokens as default | exact match |"),
            "|---|---|---|---|---|---|---|---|---|"]
    ref_ids = [t for o in outs[ref] for t in o]
    for c, t in configs:
        ts = times[(c, t)]
        med = statistics.median(ts)
        ids = [x for o in outs[(c, t)] for x in o]
        same = sum(a == b for a, b in zip(ids, ref_ids)) / len(ref_ids)
        acc = "n/a"
        if examples is not None and tok is not None:
            texts = [tok.decode(o, skip_special_tokens=False) for o in outs[(c, t)]]
            eos = tok.eos_token or "<|eos|>"
            acc = f"{sum(score(tx, ex.answer, eos) for tx, ex in zip(texts, examples))}/{len(examples)}"
        rows.append(f"| {c or 'none'} | {t if t is not None else 'none'} | {med:.3f} ({min(ts):.3f}-{max(ts):.3f}) | "
                    f"{n_tok / med:.1f} | {t_ref / med:.2f}x | {nfe[(c, t)] / len(prompts):.1f} | "
                    f"{nfe[ref] / nfe[(c, t)]:.2f}x | {same:.1%} | {acc} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=None,
                    help="checkpoint dir or embedded name (repeatable; default: tiny-llada and tiny-dream)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--w4a4", action="store_true", help="also run with W4A4Linear decoder layers (bf16 elsewhere)")
    ap.add_argument("--gen-length", type=int, default=24)
    ap.add_argument("--block-length", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="default: gen-length (one token per step)")
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.9])
    ap.add_argument("--n-per-task", type=int, default=2, help=f"prompts per task ({len(TASKS)} tasks)")
    ap.add_argument("--prompt-len", type=int, default=16, help="random prompt length (no tokenizer)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.model or [n for n in ("tiny-llada", "tiny-dream") if n in available_embedded()]
    if not names:
        ap.error("no embedded tiny models built; pass --model DIR")
    have_w4a4, why = w4a4_available()
    print(f"# bench_fast_decoding: torch {torch.__version__}, {cpu_name()}, {torch.get_num_threads()} threads, "
          f"device {args.device}, dtype {args.dtype}")
    if args.w4a4 and not have_w4a4:
        print(f"W4A4 rows skipped: {why}")
    for name in names:
        model = load_pretrained(name, dtype=getattr(torch, args.dtype), device=args.device)
        print("\n".join(["", *bench(name, f"{name} ({args.dtype})", model, args)]))
        if args.w4a4 and have_w4a4:
            q = copy.deepcopy(model).to(torch.bfloat16)
            q = to_w4a4(q, list(q.layers), q.layer_map())
            print("\n".join(["", *bench(name, f"{name} (W4A4, bf16 elsewhere)", q, args)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
