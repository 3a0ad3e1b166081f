"""Write a full-size LLaDA-8B- or Dream-7B-shaped checkpoint (random weights, official layout).

    python python/make_shaped_checkpoint.py --shape llada-8b --out /tmp/llada-8b-shaped
    python python/make_shaped_checkpoint.py --shape dream-7b --layers 2 --out /tmp/dream-2l

The result loads with ``--model DIR`` everywhere (sample, calibrate, evaluate): config.json and
generation_config.json as the official repositories ship them, bf16 shards of at most
``--shard-gb`` with model.safetensors.index.json, and a word-level tokenizer with the official
special-token ids. Full depth is ~16 GB (LLaDA) / ~15 GB (Dream) on disk; memory stays at one
shard. Keep these outside the repository, and delete them when done.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from tqdm import tqdm

from fair_calib_ext.models.shaped import SHAPES, shaped_config, write_shaped_checkpoint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llada-8b", choices=sorted(SHAPES))
    ap.add_argument("--out", required=True, help="directory to create (refused if it exists and is not empty)")
    ap.add_argument("--layers", type=int, default=None, help="decoder blocks (default: the official depth)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=2.0, help="largest shard, GB (default 2)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        shaped_config(args.shape, args.layers)
        if not 0.001 <= args.shard_gb <= 64:
            raise ValueError(f"--shard-gb must be in [0.001, 64], got {args.shard_gb}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        out = write_shaped_checkpoint(args.out, args.shape, layers=args.layers, seed=args.seed,
                                      dtype=torch.bfloat16, shard_bytes=int(args.shard_gb * 1e9),
                                      overwrite=args.overwrite,
                                      progress=lambda it, n: tqdm(it, total=n, desc=f"write {args.shape}"))
    except FileExistsError as exc:
        print(f"error: --out {exc}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e9:.2f} GB) in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
