"""Time one calibration block of a real-size model shape and project the per-block cost.

    python python/bench_calib_block.py --shape llada-8b --seqlen 256 --nsamples 2 --device cpu

Builds a one-block DiffusionLM with the real block dims (random weights, small vocabulary: the
embedding and head are not part of the block cost), runs the shared engine for each method,
and reports seconds per block split into a fixed part (teacher / student forwards, statistics,
fold, RTN or GPTQ) and the FlatQuant training part per (sample · epoch). The projection for a
full recipe scales both linearly in the number of samples and, for training, in epochs; the
sequence-length scaling is linear for the linears (which dominate: 2·S·params FLOPs) — this is
said in the output and is an extrapolation, not a measurement at the target length.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

SHAPES = {
    "llada-8b": dict(family="llada", hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                     num_key_value_heads=32, head_dim=128, attention_bias=False, rope_theta=5e5),
    "dream-7b": dict(family="dream", hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                     num_key_value_heads=4, head_dim=128, attention_bias=True, rope_theta=1e6),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llada-8b", choices=sorted(SHAPES))
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--nsamples", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["rtn", "quarot", "gptq", "flatquant"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--target-nsamples", type=int, default=128)
    ap.add_argument("--target-seqlen", type=int, default=1024)
    ap.add_argument("--target-epochs", type=int, default=15)
    ap.add_argument("--target-layers", type=int, default=32)
    args = ap.parse_args()

    from fair_calib_ext.calib import MethodConfig, calibrate
    from fair_calib_ext.calib.layerwise import peak_memory_mb
    from fair_calib_ext.models import ModelConfig, build_model

    shape = SHAPES[args.shape]
    cfg = ModelConfig(vocab_size=1024, num_hidden_layers=1, rms_norm_eps=1e-5, max_position_embeddings=4096,
                      tie_word_embeddings=False, mask_token_id=1023, **shape)
    ids = torch.randint(0, 1000, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    print(json.dumps({"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "cpu": platform.processor() or platform.machine(), "shape": args.shape,
                      "seqlen": args.seqlen, "nsamples": args.nsamples}))
    res = {}
    for method in args.methods:
        runs = [0, 1] if method in ("flatquant", "fair") else [0]
        for ep in runs:
            model = build_model(cfg, seed=0)
            logs: list[dict] = []
            t = time.time()
            calibrate(model, MethodConfig(method=method, epochs=ep, batch_size=1), ids, progress=False,
                      device=args.device, log=logs.append)
            sec = logs[0]["seconds"]
            res[(method, ep)] = sec
            print(json.dumps({"method": method, "epochs": ep, "block_seconds": sec,
                              "wall": round(time.time() - t, 2), **peak_memory_mb(args.device)}), flush=True)
            del model
    scale_s = args.target_seqlen / args.seqlen
    scale_n = args.target_nsamples / args.nsamples
    for method in args.methods:
        fixed = res[(method, 0)] * scale_n * scale_s
        train = 0.0
        if (method, 1) in res:
            train = (res[(method, 1)] - res[(method, 0)]) * scale_n * scale_s * args.target_epochs
        per_block = fixed + train
        print(json.dumps({"projection": method, "per_block_s": round(per_block, 1),
                          "model_h": round(per_block * args.target_layers / 3600, 2),
                          "basis": f"linear in samples and seqlen from {args.nsamples}x{args.seqlen} "
                                   f"(an upper bound for the fixed part: weight-only work such as "
                                   f"RTN/GPTQ/folding does not grow with samples); "
                                   f"target {args.target_nsamples}x{args.target_seqlen}, "
                                   f"{args.target_epochs} epochs, {args.target_layers} blocks"}))


if __name__ == "__main__":
    main()
