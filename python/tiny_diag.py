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
import re
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


def diagnose(model, tok, task: str, n: int, gk: dict, split: str = "val") -> dict:
    """Length-match rate, per-slot accuracy (slots 0..), exact match (all in %); ``gk`` = the
    sampler settings."""
    exs = make_examples(task, split, n, seed=0)
    texts = generate_texts(model, tok, encode_prompts(tok, [e.prompt for e in exs]), gen_kwargs=gk, batch_size=64)
    len_ok, exact, per = 0, 0, {}
    aligned: dict[str, list[int]] = {}  # operand widths equal / different -> [units right, exact, n]
    for e, t in zip(exs, texts):
        a, p = slots(task, e.answer), slots(task, t)
        right = t.strip() == e.answer.strip()
        len_ok += len(a) == len(p)
        exact += right
        for i, s in enumerate(a):
            hit, tot = per.get(i, (0, 0))
            per[i] = (hit + (i < len(p) and p[i] == s), tot + 1)
        ops = re.fullmatch(r"Q: (\d+)[+*-](\d+)=\? A:", e.prompt)
        if ops:
            key = "same_width" if len(ops.group(1)) == len(ops.group(2)) else "different_width"
            acc = aligned.setdefault(key, [0, 0, 0])
            acc[0] += bool(p) and p[0] == a[0]
            acc[1] += right
            acc[2] += 1
    out = {"length_ok": 100 * len_ok / n, "exact": 100 * exact / n,
           "slot_acc": {i: round(100 * h / c, 1) for i, (h, c) in sorted(per.items())}}
    if aligned:
        # equal operand widths line the units digits up at the same offset from the operator: if
        # the units digit is right there and not otherwise, locating digits is what is missing
        out["by_operand_width"] = {k: {"units_acc": round(100 * u / c, 1), "exact": round(100 * x / c, 1), "n": c}
                                   for k, (u, x, c) in sorted(aligned.items())}
    return out


def one_digit_sums(model, tok, gk: dict) -> dict:
    """All 100 sums a+b of single digits: exact and off-by-one rates (%). Separates "has a
    magnitude estimate" from "has the addition table"."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    texts = generate_texts(model, tok, encode_prompts(tok, [f"Q: {a}+{b}=? A:" for a, b in pairs]),
                           gen_kwargs=gk, batch_size=100)
    exact = near = 0
    for (a, b), t in zip(pairs, texts):
        got = int(t.strip()) if t.strip().isdigit() else None
        exact += got == a + b
        near += got is not None and abs(got - (a + b)) <= 1
    return {"exact": float(exact), "within_one": float(near), "n": len(pairs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_pretrained(args.model), load_tokenizer(args.model)
    gk = default_gen_kwargs(model, generation_config=load_generation_config(args.model))
    out = {t: diagnose(model, tok, t, args.n, gk) for t in TASKS}
    out["one_digit_sums"] = one_digit_sums(model, tok, gk)
    for t, r in out.items():
        print(t, json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
