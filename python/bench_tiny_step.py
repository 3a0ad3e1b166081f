#!/usr/bin/env python
"""Training-step time of train_tiny.py's model, bf16 autocast vs fp32, on this CPU (1 thread).

    OMP_NUM_THREADS=1 python python/bench_tiny_step.py --preset wide --rows 16 --row-len 96 --steps 6

Steps are full optimizer steps (packed batch, forward, backward, clip, AdamW) of train_tiny.py's
loss; the first ``--warmup`` steps of each mode are not timed. Prints one JSON line per mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_tiny as tt  # noqa: E402
from tiny_tokenizer import build_tokenizer  # noqa: E402

from fair_calib_ext.models import build_model  # noqa: E402


def bench(args: argparse.Namespace, bf16: bool) -> dict:
    tt.set_bf16(bf16)
    tok = build_tokenizer(version=args.tokenizer_version)
    cfg = tt.make_config(args.family, args, tok.get_vocab_size())
    model = build_model(cfg, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    packer = tt.Packer(tok, args.rows, args.row_len, 0, 0.3, gen_length=tt.gen_length_for(args))
    batches = [packer.batch() for _ in range(args.warmup + args.steps)]
    gen = torch.Generator().manual_seed(1)
    times = []
    for i, b in enumerate(batches):
        t = time.perf_counter()
        loss, _ = tt.loss_fn(model, b, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    n_params = sum(p.numel() for p in model.parameters())
    return {"mode": "bf16" if bf16 else "fp32", "params_M": round(n_params / 1e6, 2),
            "rows": args.rows, "row_len": args.row_len, "steps": len(times),
            "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(tt.PRESETS), default="wide")
    ap.add_argument("--family", choices=["llada", "dream"], default="llada")
    ap.add_argument("--tokenizer-version", type=int, default=2)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--row-len", type=int, default=96)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--modes", default="fp32,bf16")
    args = ap.parse_args()
    args.gen_length = 0
    for k, v in tt.PRESETS[args.preset].items():
        if k not in ("rows", "warmup"):
            setattr(args, k, v)
    torch.set_num_threads(1)
    print(json.dumps({"threads": torch.get_num_threads(), "cpu_bf16": tt.cpu_has_bf16()}))
    for m in args.modes.split(","):
        print(json.dumps(bench(args, m == "bf16")), flush=True)


if __name__ == "__main__":
    main()
