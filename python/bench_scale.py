"""Real scale on this machine: a full-size LLaDA-8B / Dream-7B-shaped checkpoint, W4A4 vs bf16.

    PYTHONPATH=. python python/bench_scale.py --shape llada-8b --work /data/scale --out BENCH.json
    PYTHONPATH=. python python/bench_scale.py --shape dream-7b --work /data/scale --parts inference calibrate \\
        --methods rtn

What it measures, each in a fresh process (so every peak RSS is that process's own):

1. ``calibrate`` per method (the CLI a user runs, small stated budgets): total seconds, seconds per
   block (from the run's calib_log.jsonl), peak RSS and peak anonymous memory (RSS minus the
   memory-mapped checkpoint pages the kernel can drop and re-read);
2. inference for the bf16 checkpoint and for the W4A4 model that ``calibrate --method rtn``
   wrote: load time, peak RSS / anonymous memory, one forward at each ``--seqs`` length, and an
   end-to-end ``generate`` of ``--gen`` tokens (one token per step, one block), 2 threads.

The checkpoint (random weights, official layout; ``python/make_shaped_checkpoint.py``) is made in
``--work`` when missing, and the quantized outputs go there too: ~16 GB + ~6 GB per model. Random
weights make the decoded tokens meaningless; time and memory are what is measured. Output: one
JSON object (``--out``) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "python"))

# fresh-process wrapper: run a module or this file's worker, then report peak RSS and peak anon
_PEAK = r"""
import resource, runpy, sys, threading, time
peak_anon = [0]
def watch():
    while True:
        try:
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    peak_anon[0] = max(peak_anon[0], int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.05)
threading.Thread(target=watch, daemon=True).start()
target = sys.argv[1]; sys.argv = sys.argv[1:]
rc = 0
try:
    runpy.run_path(target, run_name="__main__") if target.endswith(".py") else runpy.run_module(target, run_name="__main__", alter_sys=True)
except SystemExit as e:
    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
sys.stderr.write("\nPEAK %d %d\n" % (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, peak_anon[0]))
sys.exit(rc)
"""

CALIB_BUDGETS = {  # small, stated budgets: enough to exercise every phase at full size
    "rtn": ["--nsamples", "8", "--seqlen", "128"],
    "quarot+gptq": ["--nsamples", "8", "--seqlen", "128", "--w-clip-search", "off"],
    "fair": ["--nsamples", "4", "--seqlen", "64", "--epochs", "1", "--n-probe", "4", "--probe-gen-length", "8",
             "--probe-batch-size", "4"],
    "flatquant": ["--nsamples", "4", "--seqlen", "64", "--epochs", "1"],
}


def _fresh(args: list[str], timeout: int) -> tuple[float, int, int, str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", _PEAK, *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    secs = time.time() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    rss, anon = (int(v) for v in re.findall(r"PEAK (\d+) (\d+)", p.stderr)[-1])
    return secs, rss, anon, p.stdout, p.stderr


def worker(argv: list[str]) -> None:
    """In a fresh process: load, forward at each length, generate; JSON on stdout."""
    import torch

    from fair_calib_ext.models import load_pretrained
    from fair_calib_ext.quant.modules import kernel_report
    from fair_calib_ext.sampling import generate

    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--seqs", type=int, nargs="+")
    ap.add_argument("--gen", type=int)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    model = load_pretrained(a.path, dtype=torch.bfloat16)
    res: dict = {"load_s": round(time.time() - t0, 2), "forward_s": {}, **kernel_report(model)}
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    with torch.inference_mode():
        model(torch.randint(0, 1000, (1, 16), generator=g))  # warm-up: thread pool, kernels
        for s in a.seqs:
            ids = torch.randint(0, 1000, (1, s), generator=g)
            t = time.time()
            model(ids)
            res["forward_s"][str(s)] = round(time.time() - t, 3)
        prompt = torch.randint(0, min(vocab, 1000), (1, 32), generator=g)
        t = time.time()
        generate(model, prompt, gen_length=a.gen, steps=a.gen, block_length=a.gen)
        res["generate_s"] = round(time.time() - t, 2)
    res["generate_tok_s"] = round(a.gen / res["generate_s"], 3)
    print("RESULT " + json.dumps(res))


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llada-8b", choices=("llada-8b", "dream-7b"))
    ap.add_argument("--work", required=True, help="directory for the checkpoint and quantized outputs")
    ap.add_argument("--layers", type=int, default=None, help="fewer blocks (default: full depth)")
    ap.add_argument("--parts", nargs="+", default=["calibrate", "inference"], choices=("calibrate", "inference"))
    ap.add_argument("--methods", nargs="+", default=["rtn", "fair", "quarot+gptq"], choices=sorted(CALIB_BUDGETS))
    ap.add_argument("--seqs", type=int, nargs="+", default=[64, 256, 512])
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=4 * 3600, help="per step, seconds")
    ap.add_argument("--out", default=None, help="write the JSON results here")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and quantized outputs")
    args = ap.parse_args()

    from bench_ops import cpu_name

    from fair_calib_ext.models.shaped import write_shaped_checkpoint

    work = Path(args.work)
    tag = args.shape + (f"-{args.layers}l" if args.layers else "")
    ckpt = work / tag
    res: dict = {"shape": args.shape, "layers": args.layers or "full", "cpu": cpu_name(),
                 "machine": platform.machine(), "threads": args.threads, "calibrate": {}, "inference": {}}
    if not (ckpt / "model.safetensors.index.json").is_file():
        t = time.time()
        write_shaped_checkpoint(ckpt, args.shape, layers=args.layers, overwrite=True)
        print(f"wrote {ckpt} in {time.time() - t:.0f} s", file=sys.stderr, flush=True)

    def save() -> None:
        if args.out:
            tmp = Path(args.out + ".tmp")
            tmp.write_text(json.dumps(res, indent=2) + "\n")
            os.replace(tmp, args.out)

    methods = list(args.methods)
    if "inference" in args.parts and "rtn" not in methods:
        methods.insert(0, "rtn")  # the W4A4 model for the inference part
    if "calibrate" in args.parts or "inference" in args.parts:
        for m in methods:
            q = work / f"{tag}-{m.replace('+', '_')}"
            if "calibrate" not in args.parts and (q / "config.json").is_file():
                continue
            cmd = ["fair_calib_ext.calibrate", "--model", str(ckpt), "--method", m, *CALIB_BUDGETS[m], "--out", str(q),
                   "--overwrite", "--no-progress", "--threads", str(args.threads)]
            print("calibrate", m, file=sys.stderr, flush=True)
            secs, rss, anon, _, _ = _fresh(cmd, args.timeout)
            blocks = [json.loads(line) for line in (q / "calib_log.jsonl").read_text().splitlines()]
            per_block = [r["seconds"] for r in blocks if r.get("event") == "block"]
            prior = [r for r in blocks if r.get("event") == "prior"]
            res["calibrate"][m] = {"budget": " ".join(CALIB_BUDGETS[m]), "total_s": round(secs, 1),
                                   "block_s_median": round(sorted(per_block)[len(per_block) // 2], 1),
                                   "blocks": len(per_block), "prior_s": prior[0]["seconds"] if prior else None,
                                   "peak_rss_gib": round(rss / 2**30, 2), "peak_anon_gib": round(anon / 2**30, 2)}
            print(json.dumps({m: res["calibrate"][m]}), file=sys.stderr, flush=True)
            save()
    if "inference" in args.parts:
        for name, path in (("bf16", ckpt), ("w4a4", work / f"{tag}-rtn")):
            print("inference", name, file=sys.stderr, flush=True)
            cmd = [str(Path(__file__).resolve()), "--worker", str(path), "--seqs", *map(str, args.seqs),
                   "--gen", str(args.gen), "--threads", str(args.threads)]
            secs, rss, anon, out, _ = _fresh(cmd, args.timeout)
            r = json.loads(out.split("RESULT ", 1)[1])
            r.update(peak_rss_gib=round(rss / 2**30, 2), peak_anon_gib=round(anon / 2**30, 2))
            res["inference"][name] = r
            print(json.dumps({name: r}), file=sys.stderr, flush=True)
            save()
        b, w = res["inference"]["bf16"], res["inference"]["w4a4"]
        res["inference"]["speedup"] = {s: round(b["forward_s"][s] / w["forward_s"][s], 2) for s in b["forward_s"]}
        res["inference"]["speedup"]["generate"] = round(b["generate_s"] / w["generate_s"], 2)
        save()

    print(f"\n{args.shape} ({res['layers']} layers), {res['cpu']}, {args.threads} threads\n")
    if res["inference"]:
        b, w, sp = res["inference"]["bf16"], res["inference"]["w4a4"], res["inference"]["speedup"]
        print("| | load s | peak RSS GiB | peak anon GiB | " + " | ".join(f"fwd {s} s" for s in b["forward_s"])
              + f" | generate {args.gen} tok/s |")
        print("|---" * (5 + len(b["forward_s"])) + "|")
        for name, r in (("bf16", b), ("W4A4", w)):
            print(f"| {name} | {r['load_s']} | {r['peak_rss_gib']} | {r['peak_anon_gib']} | "
                  + " | ".join(str(v) for v in r["forward_s"].values()) + f" | {r['generate_tok_s']} |")
        print("| W4A4 speedup | | | | " + " | ".join(f"{sp[s]}x" for s in b["forward_s"]) + f" | {sp['generate']}x |")
    if res["calibrate"]:
        print("\n| calibrate | budget | total s | s / block (median) | Stage I s | peak RSS GiB | peak anon GiB |")
        print("|---|---|---|---|---|---|---|")
        for m, r in res["calibrate"].items():
            print(f"| {m} | {r['budget']} | {r['total_s']} | {r['block_s_median']} | {r['prior_s'] or ''} | "
                  f"{r['peak_rss_gib']} | {r['peak_anon_gib']} |")
    if not args.keep:
        import shutil

        for p in work.glob(f"{tag}*"):
            shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
    else:
        main()
