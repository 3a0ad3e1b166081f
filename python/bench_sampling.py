"""Sampling speed: fp32 vs bf16 vs W4A4, in one run, on this machine.

(a) end-to-end ``generate`` on the embedded model (or ``--model DIR``): steps/s and tokens/s;
(b) one LLaDA-8B-shaped decoder layer (d 4096, FFN 12288, 32 heads, random weights) at sequence
    length 512: forward latency per denoising step.

W4A4 swaps every decoder-layer linear (q, k, v, o, gate, up, down) for
``fair_calib_ext.nn.W4A4Linear.from_linear`` (int4 weights per channel, dynamic per-token int4
activations, through ``torch.ops.fair.w4a4_linear``); the rest of the model stays bf16 and the
LM head stays 16-bit. The W4A4 column is skipped, with a message, when the extension is not built.

    PYTHONPATH=. python python/bench_sampling.py                 # both parts
    PYTHONPATH=. python python/bench_sampling.py --skip-model --layer-repeats 3

Reports medians over ``--repeats`` timed runs after ``--warmup`` untimed ones, with min-max spread.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fair_calib_ext  # noqa: E402
from fair_calib_ext.models import ModelConfig, available_embedded, load_pretrained  # noqa: E402
from fair_calib_ext.models.transformer import DecoderLayer, rope_cos_sin  # noqa: E402
from fair_calib_ext.sampling import generate  # noqa: E402

from bench_ops import cpu_name  # noqa: E402  (python/, the same CPU line in both benchmarks)


def w4a4_available() -> tuple[bool, str]:
    """Whether the fair ops are built (W4A4Linear needs them)."""
    if getattr(fair_calib_ext, "_C", None) is None:
        return False, f"fair_calib_ext._C is not built ({getattr(fair_calib_ext, '_C_ERROR', '')})"
    return True, ""


def to_w4a4(module: nn.Module, layers: list[nn.Module], layer_map: dict) -> nn.Module:
    """Swap the decoder-layer linears named by ``layer_map`` for W4A4Linear (in place)."""
    from fair_calib_ext.nn import W4A4Linear

    names = [n for g in ("qkv", "o", "up_gate", "down") for n in layer_map[g]]
    for layer in layers:
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, child, W4A4Linear.from_linear(getattr(parent, child)))
    return module


# wall clock, or this process's CPU time (--timer cpu, one thread only): on a shared machine the
# CPU time of a single-threaded run does not count the time it spent descheduled
CLOCK: Callable[[], float] = time.perf_counter


def timeit(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        out.append(CLOCK() - t0)
    return out


def fmt(ts: list[float], scale: float = 1.0, unit: str = "") -> str:
    def f(v: float) -> str:
        v *= scale
        return f"{v:.0f}" if v >= 100 else f"{v:.3g}"

    return f"{f(statistics.median(ts))}{unit} ({f(min(ts))}-{f(max(ts))})"


def bench_model(args: argparse.Namespace, have_w4a4: bool) -> list[str]:
    name = args.model or ("tiny-llada" if "tiny-llada" in available_embedded() else None)
    if name is None:
        return ["(a) skipped: the embedded model fair_calib_ext/assets/tiny-llada is not built yet "
                "(pass --model DIR)"]
    base = load_pretrained(name)
    cfg = base.config
    variants: dict[str, nn.Module] = {"fp32": base, "bf16": copy.deepcopy(base).to(torch.bfloat16)}
    if have_w4a4:
        q = copy.deepcopy(base).to(torch.bfloat16)
        variants["W4A4"] = to_w4a4(q, list(q.layers), q.layer_map())
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, min(cfg.vocab_size, 100), (args.batch, args.prompt_len), generator=g)
    steps = args.steps or args.gen_length
    rows = [
        f"(a) {name}: {cfg.family}, d={cfg.hidden_size}, layers={cfg.num_hidden_layers}, "
        f"batch {args.batch}, prompt {args.prompt_len}, gen {args.gen_length}, steps {steps}, "
        f"block {args.block_length or args.gen_length}",
        "",
        "| variant | s / generate (min-max) | steps/s | tokens/s | vs fp32 | vs bf16 |",
        "|---|---|---|---|---|---|",
    ]
    res: dict[str, list[float]] = {}
    for label, model in variants.items():
        res[label] = timeit(lambda m=model: generate(m, prompt, gen_length=args.gen_length, steps=steps,
                                                     block_length=args.block_length), args.warmup, args.repeats)
    med = {k: statistics.median(v) for k, v in res.items()}
    for label, ts in res.items():
        t = med[label]
        rows.append(f"| {label} | {fmt(ts)} | {steps / t:.2f} | {args.batch * args.gen_length / t:.1f} | "
                    f"{med['fp32'] / t:.2f}x | {med['bf16'] / t:.2f}x |")
    return rows


def bench_layer(args: argparse.Namespace, have_w4a4: bool) -> list[str]:
    cfg = ModelConfig(
        family="llada", vocab_size=126464, hidden_size=4096, intermediate_size=12288, num_hidden_layers=1,
        num_attention_heads=32, num_key_value_heads=32, head_dim=128, rope_theta=5e5, rms_norm_eps=1e-5,
        max_position_embeddings=4096, attention_bias=False, tie_word_embeddings=False, mask_token_id=126336,
    )
    torch.manual_seed(0)
    layer = DecoderLayer(cfg)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    layer.eval()
    s = args.seq_len
    pos = torch.arange(s)[None]
    x32 = torch.randn(1, s, cfg.hidden_size)
    variants: dict[str, tuple[nn.Module, torch.dtype]] = {"fp32": (layer, torch.float32)}
    variants["bf16"] = (copy.deepcopy(layer).to(torch.bfloat16), torch.bfloat16)
    if have_w4a4:
        q = copy.deepcopy(layer).to(torch.bfloat16)
        variants["W4A4"] = (to_w4a4(q, [q], {"qkv": ["attn.q_proj", "attn.k_proj", "attn.v_proj"],
                                             "o": ["attn.o_proj"], "up_gate": ["mlp.up_proj", "mlp.gate_proj"],
                                             "down": ["mlp.down_proj"]}), torch.bfloat16)
        del q
    rows = [
        f"(b) one LLaDA-8B decoder layer (d 4096, FFN 12288, 32 heads), batch 1, seq {s}: forward per step",
        "",
        "| variant | ms / step (min-max) | steps/s | vs fp32 | vs bf16 |",
        "|---|---|---|---|---|",
    ]
    res: dict[str, list[float]] = {label: [] for label in variants}
    pe = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, torch.float32)
    calls = {label: (lambda m=mod, x=x32.to(dt): m(x, position_embeddings=pe)) for label, (mod, dt) in variants.items()}
    with torch.no_grad():  # interleaved rounds: a load change hits every variant alike
        for fn in calls.values():
            timeit(fn, args.warmup, 0)
        for _ in range(args.layer_repeats):
            for label, fn in calls.items():
                res[label] += timeit(fn, 0, 1)
    med = {k: statistics.median(v) for k, v in res.items()}
    for label, ts in res.items():
        rows.append(f"| {label} | {fmt(ts, 1e3)} | {1 / med[label]:.2f} | {med['fp32'] / med[label]:.2f}x | "
                    f"{med['bf16'] / med[label]:.2f}x |")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint dir or embedded name (default tiny-llada)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--gen-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--block-length", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layer-repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--timer", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time (needs --threads 1; robust to a loaded machine)")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--skip-layer", action="store_true")
    args = ap.parse_args(argv)
    if args.timer == "cpu" and args.threads != 1:
        ap.error("--timer cpu measures process CPU time and needs --threads 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.timer == "cpu" else time.perf_counter
    have, why = w4a4_available()
    isa = ""
    if have:
        from fair_calib_ext import ops

        isa = ops.get_cpu_isa()
    print(f"# bench_sampling: torch {torch.__version__}, {cpu_name()}, "
          f"{torch.get_num_threads()} threads, W4A4 ISA: {isa or 'n/a'}, timer: {args.timer}")
    if not have:
        print(f"W4A4 column skipped: {why}")
    blocks = []
    if not args.skip_model:
        blocks.append(bench_model(args, have))
    if not args.skip_layer:
        blocks.append(bench_layer(args, have))
    for b in blocks:
        print()
        print("\n".join(b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
