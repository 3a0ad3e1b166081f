#!/usr/bin/env python
"""Export a tiny-model training run into fair_calib_ext/assets/<name>/ and document it.

Steps: official-layout export (train_tiny.py --export), golden samples for tests/test_assets.py
(decoded with the project's sampler at the default settings), FP and W4A4 RTN accuracy on the test
split (tiny_eval.py), MODEL_CARD.md (tiny_card.py).

    python python/tiny_release.py --family llada --run /work/ckpt/llada --n 100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GOLDEN_PROMPTS = ["Q: sort 7 3 9 1 4 A:", "Q: reverse cat dog sun A:", "Q: 48*7=? A:",
                  "Q: 482+937=? A:", "Q: 482-137=? A:",
                  "Q: Tom has 12 apples. He buys 7 more and gives 5 away. How many apples does Tom have? A:"]


def golden(asset: Path) -> dict:
    """Token ids of the generation region for GOLDEN_PROMPTS (default sampler settings)."""
    from fair_calib_ext.eval.accuracy import default_gen_kwargs
    from fair_calib_ext.models import load_generation_config, load_pretrained, load_tokenizer
    from fair_calib_ext.sampling import generate

    model, tok = load_pretrained(asset), load_tokenizer(asset)
    gk = default_gen_kwargs(model, generation_config=load_generation_config(asset))
    out = {}
    for p in GOLDEN_PROMPTS:
        x = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        out[p] = generate(model, x, **gk)[0, x.shape[1]:].tolist()
        print(repr(p), "->", repr(tok.decode(out[p])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=["llada", "dream"], required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--notes-file", default=None)
    ap.add_argument("--extra", action="store_true",
                    help="tiny_eval.py --extra: operand-width and out-of-list reverse accuracy in the card")
    args = ap.parse_args()
    torch.set_num_threads(1)
    name = f"tiny-{args.family}"
    asset = ROOT / "fair_calib_ext" / "assets" / name
    py = sys.executable
    subprocess.run([py, str(ROOT / "python" / "train_tiny.py"), "--family", args.family, "--out", args.run,
                    "--export", str(asset)], check=True)
    (asset / "golden_samples.json").write_text(json.dumps(golden(asset), indent=1) + "\n")
    ev = Path(args.run) / "eval_test.json"
    subprocess.run([py, str(ROOT / "python" / "tiny_eval.py"), str(asset), "--n", str(args.n),
                    "--json", str(ev)] + (["--extra"] if args.extra else []), check=True)
    cmd = [py, str(ROOT / "python" / "tiny_card.py"), "--name", name, "--run", args.run, "--eval", str(ev),
           "--out", str(asset)]
    if args.notes_file:
        cmd += ["--notes", Path(args.notes_file).read_text()]
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
