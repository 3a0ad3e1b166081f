"""Evaluate one model (optionally against its full-precision teacher): task accuracy, MC-ELBO
perplexity and mechanism metrics, sharded across torchrun ranks.

Used by ``python -m fair_calib_ext.evaluate`` and ``python/reproduce.py``. Every stage shards its
samples by global index (:mod:`.distributed`) and gathers results, so one process and N ranks
give the same numbers (per-example randomness is seeded by index).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from .accuracy import (
    _pad_id,
    encode_prompts,
    generate_texts,
    length_buckets,
    pad_batch,
    score_predictions,
    summarize_accuracy,
    task_examples,
)
from .distributed import DistContext, gather, gather_indexed, shard
from .likelihood import perplexity, score_continuations, text_pairs

__all__ = ["expand_tasks", "metric_prompts", "evaluate_model"]

SPECIAL_TASKS = ("suite", "ppl", "metrics")


def expand_tasks(names: Sequence[str]) -> tuple[list[str], bool, bool]:
    """Split CLI task names into (suite task names, want_ppl, want_metrics); "suite" = all six."""
    from .tasks import TASKS

    suite: list[str] = []
    ppl = metrics = False
    for n in names:
        if n == "suite":
            suite += [t for t in TASKS if t not in suite]
        elif n == "ppl":
            ppl = True
        elif n == "metrics":
            metrics = True
        elif n in TASKS:
            if n not in suite:
                suite.append(n)
        else:
            raise ValueError(f"unknown task {n!r}; expected one of {list(TASKS) + list(SPECIAL_TASKS)}")
    return suite, ppl, metrics


def metric_prompts(n: int, seed: int, split: str = "test") -> list[str]:
    """``n`` prompts of ``split``, the six tasks interleaved (the mechanism-metric prompt set)."""
    from .tasks import TASKS, make_examples

    per = -(-n // len(TASKS)) if n else 0
    pools = {t: make_examples(t, split, per, seed=seed) for t in TASKS}
    return [pools[TASKS[i % len(TASKS)]][i // len(TASKS)].prompt for i in range(n)]


def _suite(model, tokenizer, tasks, n, seed, gen_kwargs, batch_size, prefix, ctx, progress,
           split="test") -> dict[str, Any]:
    examples = task_examples(tasks, n, seed, split=split)
    idx, mine = shard(examples, ctx)
    ids = encode_prompts(tokenizer, [e.prompt for e in mine], prefix)
    texts = generate_texts(model, tokenizer, ids, gen_kwargs=gen_kwargs, batch_size=batch_size,
                           eos_id=tokenizer.eos_token_id, progress=progress, desc="tasks")
    correct = gather_indexed(idx, score_predictions(mine, texts), ctx)
    preds = gather_indexed(idx, texts, ctx)
    out = summarize_accuracy(tasks, examples, correct)
    out["correct"] = "".join("1" if c else "0" for c in correct)  # per example, for paired statistics
    out["samples"] = [{"task": e.task, "prompt": e.prompt, "answer": e.answer.strip(), "prediction": p}
                      for e, p in list(zip(examples, preds))[: 3 * len(tasks)]]
    return out


def _ppl(model, tokenizer, n, seed, mc_num, batch_size, ctx, progress) -> dict[str, Any]:
    from .corpus import heldout_texts

    pairs = text_pairs(tokenizer, heldout_texts(n, seed=seed))
    idx, mine = shard(pairs, ctx)
    res = score_continuations(model, mine, mc_num=mc_num, batch_size=batch_size, seed=seed, indices=idx,
                              progress=progress, desc="ppl")
    nll = gather_indexed(res.index, list(zip(res.nll, res.n_tokens)), ctx)
    from .likelihood import ElboResult

    full = ElboResult(index=list(range(len(nll))), nll=[a for a, _ in nll], n_tokens=[b for _, b in nll])
    out = perplexity(full)
    out["mc_num"] = mc_num
    return out


def _metrics(model, teacher, tokenizer, n, seed, gen_kwargs, batch_size, prefix, ctx, progress,
             split="test") -> dict[str, Any]:
    from fair_calib_ext.metrics import mechanism_records, merge_records, summarize_mechanism

    prompts = metric_prompts(n, seed, split)
    idx, mine = shard(prompts, ctx)
    ids = encode_prompts(tokenizer, mine, prefix)
    device = next(model.parameters()).device
    parts = []
    batches = length_buckets(ids, batch_size)
    it: Any = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="metrics", leave=False)
    pad = _pad_id(model, tokenizer)
    per_prompt: dict[int, tuple[int, int]] = {}  # local prompt index -> (flips, commits)
    for b in it:
        x, mask = pad_batch([ids[i] for i in b], pad, device)
        rec = mechanism_records(teacher, model, x, attention_mask=mask, gen_kwargs=gen_kwargs)
        parts.append(rec)
        fl = torch.bincount(rec.flips.row, weights=rec.flips.flip.double(), minlength=len(b))
        cm = torch.bincount(rec.flips.row, minlength=len(b))
        for j, i in enumerate(b):
            per_prompt[idx[i]] = (int(fl[j]), int(cm[j]))
    gathered = [p for part in gather(parts, ctx) for p in part]
    pp = dict(kv for part in gather(list(per_prompt.items()), ctx) for kv in part)
    if not gathered:
        raise ValueError("no prompts for the mechanism metrics (n must be >= 1)")
    out = summarize_mechanism(merge_records(gathered))
    out["n_prompts"] = len(prompts)
    out["flips"]["per_prompt"] = [list(pp[i]) for i in range(len(prompts))]  # [flips, commits] per prompt
    return out


@torch.no_grad()
def evaluate_model(
    model: Any,
    tokenizer: Any,
    *,
    teacher: Any | None = None,
    tasks: Sequence[str] = (),
    want_ppl: bool = False,
    want_metrics: bool = False,
    n: int = 50,
    n_ppl: int | None = None,
    n_metrics: int = 32,
    seed: int = 0,
    split: str = "test",
    mc_num: int = 128,
    batch_size: int = 32,
    gen_kwargs: dict[str, Any],
    prompt_prefix: Sequence[int] = (),
    ctx: DistContext | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Results dict {"tasks", "ppl", "metrics", "time_s"} for the requested parts.

    ``teacher`` is the full-precision model for the mechanism metrics (default: ``model`` itself,
    which gives the FP reference row: no flips, the teacher's own mismatch and lag).
    ``split`` selects the task and metric prompts (``val`` for choosing defaults, ``test`` to report).
    """
    ctx = ctx or DistContext()
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    if tasks:
        out["tasks"] = _suite(model, tokenizer, list(tasks), n, seed, gen_kwargs, batch_size, prompt_prefix, ctx, progress,
                              split)
    if want_ppl:
        out["ppl"] = _ppl(model, tokenizer, n_ppl or n, seed, mc_num, batch_size, ctx, progress)
    if want_metrics:
        out["metrics"] = _metrics(model, teacher if teacher is not None else model, tokenizer, n_metrics, seed,
                                  gen_kwargs, batch_size, prompt_prefix, ctx, progress, split)
    out["time_s"] = time.perf_counter() - t0
    return out
