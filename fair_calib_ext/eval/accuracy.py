"""Exact-match accuracy on the embedded task suite, decoding with the diffusion sampler.

Prompts are sorted by token length, cut into batches and left-padded with an attention mask
(which leaves the real tokens' logits unchanged, see :func:`pad_batch`). Decoding settings (``gen_kwargs``) are passed straight to
``fair_calib_ext.sampling.generate``; :func:`default_gen_kwargs` gives the project defaults.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "default_gen_kwargs",
    "encode_prompts",
    "length_buckets",
    "pad_batch",
    "decode_generation",
    "generate_texts",
    "task_examples",
    "score_predictions",
    "summarize_accuracy",
]


def default_gen_kwargs(
    model: Any,
    *,
    gen_length: int | None = None,
    steps: int | None = None,
    block_length: int | None = None,
    remasking: str | None = None,
    generation_config: dict[str, Any] | None = None,
    cache: str | None = None,
    threshold: float | str | None = None,
) -> dict[str, Any]:
    """Sampler settings: explicit arguments, then the checkpoint's generation_config.json
    (keys ``gen_length``/``max_new_tokens``, ``steps``, ``block_length``, ``remasking``/``alg``),
    then defaults: the task suite's GEN_LENGTH, steps = gen_length (one token per step), LLaDA
    one block with ``low_confidence``, Dream its timestep schedule (no blocks) with ``entropy``;
    temperature 0. Resolved and validated by the same function as ``sample``'s
    (:func:`fair_calib_ext.sampling.settings.resolve_sampler_settings`): an invalid value raises
    ``UsageError``, it is never replaced by a default. ``cache`` (none/prefix/dual) and
    ``threshold`` select Fast-dLLM decoding; they appear in the result only when set."""
    from ..sampling.settings import check_fast_for_family, resolve_sampler_settings
    from .tasks import GEN_LENGTH

    family = getattr(model.config, "family", "llada")
    st = resolve_sampler_settings(gen_length=gen_length, steps=steps, block_length=block_length,
                                  remasking=remasking, generation_config=generation_config,
                                  default_gen_length=GEN_LENGTH, cache=cache, threshold=threshold)
    bl = st.block_length
    if bl is None and family != "dream":
        bl = st.gen_length  # LLaDA: one block = pure diffusion; Dream without blocks uses its timestep schedule
    rm = st.remasking or ("entropy" if family == "dream" else "low_confidence")
    check_fast_for_family(st, family, rm)
    out: dict[str, Any] = {"gen_length": st.gen_length, "steps": st.steps, "block_length": bl, "remasking": rm,
                           "temperature": 0.0}
    if st.fast:
        out.update(cache=st.cache, threshold=st.threshold)
    return out


def encode_prompts(tokenizer: Any, prompts: Sequence[str], prefix_ids: Sequence[int] = ()) -> list[list[int]]:
    """Token ids of each prompt (no special tokens added), after ``prefix_ids`` (e.g. [BOS])."""
    return [list(prefix_ids) + list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]


def length_buckets(seqs: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices sorted by sequence length and cut into batches of ≤ batch_size (little padding)."""
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor | None]:
    """Left-pad a batch: (ids [B, P], attention_mask [B, P] or None when nothing is padded).

    Left padding with a key mask leaves the real tokens' logits unchanged for both families
    (RoPE scores depend only on position differences; Dream re-numbers positions under a mask).
    """
    from fair_calib_ext.sampling import left_pad

    ids, mask = left_pad(seqs, pad_id)
    if bool(mask.bool().all()):
        return ids.to(device), None
    return ids.to(device), mask.to(device)


def decode_generation(tokenizer: Any, gen_ids: Sequence[int], eos_id: int | None) -> str:
    """Text of a generated region up to (not including) the first EOS."""
    ids = list(gen_ids)
    if eos_id is not None and eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=False)


@torch.no_grad()
def generate_texts(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    gen_kwargs: dict[str, Any],
    batch_size: int = 32,
    eos_id: int | None = None,
    progress: bool = False,
    desc: str = "generate",
    on_batch: Callable[[list[int], Tensor], None] | None = None,
) -> list[str]:
    """Decode every prompt; returns the generated text (before EOS) in input order."""
    from fair_calib_ext.sampling import generate

    device = _device(model)
    texts: list[str] = [""] * len(prompt_ids)
    batches = length_buckets(prompt_ids, batch_size)
    it: Iterable = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc=desc, leave=False)
    eos = eos_id if eos_id is not None else getattr(model.config, "eos_token_id", None)
    pad = _pad_id(model, tokenizer)
    for idx in it:
        x, mask = pad_batch([list(prompt_ids[i]) for i in idx], pad, device)
        out = generate(model, x, attention_mask=mask, **gen_kwargs)
        gen = out[:, x.shape[1] :].cpu()
        if on_batch is not None:
            on_batch(idx, gen)
        for j, i in enumerate(idx):
            texts[i] = decode_generation(tokenizer, gen[j].tolist(), eos)
    return texts


def _pad_id(model: Any, tokenizer: Any) -> int:
    for v in (getattr(tokenizer, "pad_token_id", None), getattr(model.config, "pad_token_id", None),
              getattr(model.config, "eos_token_id", None)):
        if v is not None:
            return int(v)
    return 0


def _device(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    return dev if isinstance(dev, torch.device) else next(model.parameters()).device


def task_examples(tasks: Sequence[str], n: int, seed: int, split: str = "test") -> list[Any]:
    """``n`` examples per task from the embedded suite, tasks in the given order."""
    from .tasks import make_examples

    return [ex for t in tasks for ex in make_examples(t, split, n, seed=seed)]


def score_predictions(examples: Sequence[Any], texts: Sequence[str]) -> list[bool]:
    """Exact match of each prediction with its example's answer (tasks.score)."""
    from .tasks import score

    return [bool(score(t, ex.answer)) for ex, t in zip(examples, texts)]


def summarize_accuracy(tasks: Sequence[str], examples: Sequence[Any], correct: Sequence[bool]) -> dict[str, Any]:
    """Per-task accuracy (fraction), counts and the unweighted average over tasks."""
    per: dict[str, dict[str, float]] = {}
    for t in tasks:
        hits = [c for ex, c in zip(examples, correct) if ex.task == t]
        per[t] = {"acc": (sum(hits) / len(hits)) if hits else float("nan"), "n": len(hits), "correct": sum(hits)}
    vals = [v["acc"] for v in per.values() if v["n"]]
    return {"per_task": per, "avg": sum(vals) / len(vals) if vals else float("nan")}
