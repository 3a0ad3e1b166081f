#!/usr/bin/env python
"""Accuracy of an embedded tiny model per task, in full precision and under W4A4 RTN.

Decoding uses the project's sampler through ``fair_calib_ext.eval.accuracy`` at the model's
default settings (``default_gen_kwargs``: gen_length = steps = GEN_LENGTH, temperature 0; LLaDA
one block with low-confidence remasking, Dream its own schedule with entropy confidence).

W4A4 RTN: every linear inside the decoder layers (q/k/v/o, gate/up/down) replaced by
``fair_calib_ext.nn.W4A4Linear.from_linear`` (int4 packed weights with a per-output-channel
symmetric scale, per-token dynamic int4 activations, round half to even, no clipping, no
transforms) when the extension ``fair_calib_ext._C`` is built; otherwise an fp32 fake-quant with
the same arithmetic. The output head and the embeddings stay in full precision.

    python python/tiny_eval.py tiny-llada --n 100 --json out.json

``--extra`` adds what shows generalisation (issue 12), FP and W4A4, test-split prompts in the
suite's exact formats: ``add_w1``..``add_w3`` / ``sub_w1``..``sub_w3`` (both operands exactly w
digits), ``add_u999`` / ``sub_u999`` (operands uniform in 0-999), ``reverse_oov`` (2-6 words drawn
from the tokenizer's single-token words that are NOT in ``eval.tasks.WORDS``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fair_calib_ext.eval.accuracy import (  # noqa: E402
    default_gen_kwargs,
    encode_prompts,
    generate_texts,
    score_predictions,
)
from fair_calib_ext.eval.tasks import TASKS, WORDS, Example, make_examples, split_of  # noqa: E402
from fair_calib_ext.models import load_generation_config, load_pretrained, load_tokenizer  # noqa: E402


class FakeW4A4Linear(nn.Module):
    """fp32 fake-quant W4A4: per-output-channel int4 weights, per-token int4 activations."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        w = lin.weight.detach().float()
        self.register_buffer("w", _fq(w))
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(_fq(x.float()), self.w)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


def _fq(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int4 fake-quant over the last dim: scale = absmax/7, round half even, [-8, 7]."""
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax))
    return torch.clamp(torch.round(x / scale), -8, 7) * scale


def quantize_rtn(model: nn.Module) -> tuple[nn.Module, str]:
    """Copy of ``model`` with every decoder-layer linear in W4A4 RTN; returns (model, backend)."""
    q = copy.deepcopy(model)
    try:
        import fair_calib_ext

        if fair_calib_ext._C is None:
            raise ImportError(str(fair_calib_ext._C_ERROR))
        from fair_calib_ext.nn import W4A4Linear

        make, backend = W4A4Linear.from_linear, "fair_calib_ext.nn.W4A4Linear (int4 kernels)"
    except (ImportError, AttributeError):
        make, backend = FakeW4A4Linear, "pure-torch fp32 fake-quant"
    for layer in q.layers:
        for name, mod in list(layer.named_modules()):
            if isinstance(mod, nn.Linear):
                parent, _, attr = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, attr, make(mod))
    return q, backend


def accuracy(model, tok, gen_kwargs: dict, n: int, seed: int, split: str,
             texts_out: dict | None = None) -> dict[str, float]:
    """Exact-match accuracy (%) per task and the mean; decoded texts go to ``texts_out``."""
    res = {}
    for task in TASKS:
        exs = make_examples(task, split, n, seed=seed)
        ids = encode_prompts(tok, [e.prompt for e in exs])
        texts = generate_texts(model, tok, ids, gen_kwargs=gen_kwargs, batch_size=64)
        res[task] = 100.0 * sum(score_predictions(exs, texts)) / n
        if texts_out is not None:
            texts_out[task] = texts
    res["mean"] = sum(res[t] for t in TASKS) / len(TASKS)
    return res


def _operands(rng, mode: str) -> tuple[int, int]:
    if mode == "u999":
        return rng.randint(0, 999), rng.randint(0, 999)
    w = int(mode[1:])
    lo = 0 if w == 1 else 10 ** (w - 1)
    return rng.randint(lo, 10**w - 1), rng.randint(lo, 10**w - 1)


def extra_sets(tok, n: int, seed: int, split: str = "test") -> dict[str, list]:
    """Generalisation sets (see the module docstring), prompts of ``split`` by the suite's hash."""
    import random

    rng = random.Random(1_000_033 + seed)
    sets: dict[str, list] = {}

    def draw(make) -> list:
        out, seen = [], set()
        for _ in range(200 * n):
            e = make()
            if split_of(e.prompt) == split and e.prompt not in seen:
                seen.add(e.prompt)
                out.append(e)
                if len(out) == n:
                    break
        return out

    for mode in ("w1", "w2", "w3", "u999"):
        def add(mode=mode):
            a, b = _operands(rng, mode)
            return Example("add", f"Q: {a}+{b}=? A:", f" {a + b}")

        def sub(mode=mode):
            a, b = sorted(_operands(rng, mode), reverse=True)
            return Example("sub", f"Q: {a}-{b}=? A:", f" {a - b}")
        sets[f"add_{mode}"], sets[f"sub_{mode}"] = draw(add), draw(sub)
    vocab = tok.get_vocab()
    oov = sorted(t[1:] for t in vocab if t.startswith("\u2581") and t[1:].isascii() and t[1:].isalpha()
                 and t[1:] not in WORDS and t[1:] not in ("Q", "A"))

    def rev():
        ws = rng.sample(oov, rng.randint(2, 6))
        return Example("reverse", "Q: reverse " + " ".join(ws) + " A:", " " + " ".join(reversed(ws)))
    if len(oov) >= 6:
        sets["reverse_oov"] = draw(rev)
    return sets


def accuracy_sets(model, tok, gen_kwargs: dict, sets: dict[str, list]) -> dict[str, float]:
    """Exact-match accuracy (%) on each named example set."""
    res = {}
    for name, exs in sets.items():
        ids = encode_prompts(tok, [e.prompt for e in exs])
        texts = generate_texts(model, tok, ids, gen_kwargs=gen_kwargs, batch_size=64)
        res[name] = 100.0 * sum(score_predictions(exs, texts)) / max(len(exs), 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="embedded name or checkpoint dir")
    ap.add_argument("--n", type=int, default=100, help="test examples per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="test")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-quant", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--extra", action="store_true",
                    help="also operand-width / uniform-operand arithmetic and out-of-list reverse words")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_pretrained(args.model)
    tok = load_tokenizer(args.model)
    gk = default_gen_kwargs(model, generation_config=load_generation_config(args.model))
    out = {"model": args.model, "n_per_task": args.n, "split": args.split, "gen_kwargs": gk}
    t = time.time()
    fp_texts: dict = {}
    out["fp"] = accuracy(model, tok, gk, args.n, args.seed, args.split, fp_texts)
    print("FP   ", json.dumps(out["fp"]), f"{time.time() - t:.0f}s", flush=True)
    sets = extra_sets(tok, args.n, args.seed, args.split) if args.extra else {}
    if sets:
        out["extra_n"] = {k: len(v) for k, v in sets.items()}  # add_w1/sub_w1: ~10 distinct test prompts
        out["fp_extra"] = accuracy_sets(model, tok, gk, sets)
        print("FP+  ", json.dumps(out["fp_extra"]), flush=True)
    if not args.no_quant:
        qm, backend = quantize_rtn(model)
        out["w4a4_backend"] = backend
        t = time.time()
        q_texts: dict = {}
        out["w4a4_rtn"] = accuracy(qm, tok, gk, args.n, args.seed, args.split, q_texts)
        # sensitivity independent of accuracy: how often the quantized answer equals the FP one
        agree = {t: 100.0 * sum(a.strip() == b.strip() for a, b in zip(fp_texts[t], q_texts[t])) / args.n
                 for t in TASKS}
        agree["mean"] = sum(agree[t] for t in TASKS) / len(TASKS)
        out["w4a4_same_as_fp"] = agree
        print("same ", json.dumps(agree), flush=True)
        print("W4A4 ", json.dumps(out["w4a4_rtn"]), f"{time.time() - t:.0f}s ({backend})", flush=True)
        if sets:
            out["w4a4_rtn_extra"] = accuracy_sets(qm, tok, gk, sets)
            print("W4A4+", json.dumps(out["w4a4_rtn_extra"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
