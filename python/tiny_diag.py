#!/usr/bin/env python
"""What a tiny model has learned, per task: answer length, per-slot accuracy, exact match.

For number answers slots are digits aligned from the right (units first: carries show up as the
higher slots failing); for lists (sort, reverse) slots are elements from the left. Decoding is
the project's sampler at the model's default settings.

    python python/tiny_diag.py tiny-llada --n 100
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fair_calib_ext.eval.accuracy import default_gen_kwargs, encode_prompts, generate_texts  # noqa: E402
from fair_calib_ext.eval.tasks import TASKS, make_examples  # noqa: E402
from fair_calib_ext.models import load_generation_config, load_pretrained, load_tokenizer  # noqa: E402


def slots(task: str, text: str) -> list[str]:
    """Answer slots: digits right-aligned for numbers, elements for lists."""
    text = text.strip()
    if task in ("sort", "reverse"):
        return text.split()
    return list(reversed(text))


def diagnose(model, tok, task: str, n: int, split: str = "val") -> dict:
    """Length-match rate, per-slot accuracy (slots 0..), exact match (all in %)."""
    exs = make_examples(task, split, n, seed=0)
    gk = default_gen_kwargs(model, generation_config=load_generation_config(model.name_or_path))
    texts = generate_texts(model, tok, encode_prompts(tok, [e.prompt for e in exs]), gen_kwargs=gk, batch_size=64)
    len_ok, exact, per = 0, 0, {}
    for e, t in zip(exs, texts):
        a, p = slots(task, e.answer), slots(task, t)
        len_ok += len(a) == len(p)
        exact += t.strip() == e.answer.strip()
        for i, s in enumerate(a):
            hit, tot = per.get(i, (0, 0))
            per[i] = (hit + (i < len(p) and p[i] == s), tot + 1)
    return {"length_ok": 100 * len_ok / n, "exact": 100 * exact / n,
            "slot_acc": {i: round(100 * h / c, 1) for i, (h, c) in sorted(per.items())}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_pretrained(args.model), load_tokenizer(args.model)
    model.name_or_path = args.model
    out = {t: diagnose(model, tok, t, args.n) for t in TASKS}
    for t, r in out.items():
        print(t, json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
