"""Fast-dLLM decoding: a block-wise approximate KV cache and confidence-threshold parallel commits.

Written from the public NVlabs/Fast-dLLM samplers (their semantics, quirks included):

* **LLaDA family** (``llada/generate.py``: ``generate``, ``generate_with_prefix_cache``,
  ``generate_with_dual_cache``). Blocks left to right. Step 0 of a block runs the model on the
  whole sequence and, with a cache, keeps every layer's keys/values. Later steps run on a
  window: the prefix cache runs [block start, end of sequence) over the cached keys/values of
  the positions before the block; the dual cache runs the block alone over the cached prefix
  *and* suffix, replacing the block's entries with the fresh ones. Without a cache every step
  runs on the whole sequence. A step commits, among the block's masked positions, the
  ``num_transfer_tokens`` most confident ones (confidence: the float64 softmax probability of the
  argmax, or uniform noise for ``random``); with ``threshold``, every one whose confidence is
  >= threshold and always the most confident one. A block ends once it has no mask left, so
  a threshold block usually takes fewer steps than ``steps / num_blocks``. With a cache, no
  completion check follows step 0: a block completed there costs one more (empty) forward; the
  count schedule ends a block after ``steps / num_blocks`` steps. At temperature > 0 the prefix
  loop draws one extra, unused Gumbel noise per window step, as Fast-dLLM's does (seeded runs match).
* **Dream family** (``dream/model/generation_utils_block.py``, the block ``_sample`` with
  ``dual_cache`` and ``alg``). A block starts with a forward over the whole sequence that fills
  the cache and commits the block's *first* position with its top candidate, whatever its
  confidence. Then each step runs the window (prefix: block start to the end; dual: the block)
  and shifts the logits *within the window* (Dream's raw logit i predicts token i + 1; the
  window's first column repeats its own logit — harmless, as that position is committed). With
  ``threshold`` (``alg="confidence_threshold"``) a step commits as above with the candidate's
  top-p/top-k probability as confidence (in the logits' dtype); otherwise Dream's entropy rule
  on timesteps ``linspace(1, eps, steps_per_block + 1)`` from index 1, all that is left at index
  ``steps_per_block - 1``, and the block stops at index ``steps_per_block`` even with masks left
  (so with one step per block only the first position is ever committed).

``cache=None`` with a threshold runs the same loops with a full forward at every step.

A candidate equal to [MASK] (which trained models do not predict, tiny random ones do) is
committed as Fast-dLLM does, leaving its position masked. Where Fast-dLLM would then never end
(a deterministic threshold step that changed nothing repeats forever) or index past its count
schedule (LLaDA), the block ends with the mask left, as the default sampler's last step would. The loops
are batch 1, as Fast-dLLM's; :func:`~fair_calib_ext.sampling.generate` decodes a batch row by row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..models.transformer import KVCache, align_logits
from .generate import _record_before
from .trace import DecodeStats, Trace

__all__ = ["fast_dream", "fast_llada"]

NEG_INF = float("-inf")


class _Counter:
    """Counts forwards into the optional stats object and trace."""

    def __init__(self, stats: DecodeStats | None, trace: Trace | None) -> None:
        self.stats, self.trace, self.n = stats, trace, 0

    def tick(self) -> None:
        self.n += 1
        if self.stats is not None:
            self.stats.nfe += 1
            self.stats.steps += 1
        if self.trace is not None:
            self.trace.nfe += 1


def _refresh(model: torch.nn.Module, x: torch.Tensor, cache: str | None, shift: bool
             ) -> tuple[torch.Tensor, KVCache | None]:
    """Aligned logits [1, L, V] of the whole sequence and, with a cache, every layer's keys/values."""
    kv = KVCache.empty(model.config.num_hidden_layers) if cache is not None else None
    logits = model(x, kv_cache=kv).logits if kv is not None else model(x).logits
    return align_logits(logits, shift), kv


def _window(length: int, lo: int, hi: int, cache: str | None) -> tuple[int, int]:
    """Positions a non-refresh step runs on."""
    if cache == "dual":
        return lo, hi
    if cache == "prefix":
        return lo, length
    return 0, length


def _window_logits(model: torch.nn.Module, x: torch.Tensor, ws: int, we: int, kv: KVCache | None,
                   shift: bool) -> torch.Tensor:
    """Logits [1, we - ws, V] of the window; Dream's shift is applied within the window, as
    Fast-dLLM does (so column 0 repeats its own logit)."""
    if kv is None:  # no cache: the whole sequence, aligned as usual, then the window's columns
        return align_logits(model(x).logits, shift)[:, ws:we]
    return align_logits(model(x[:, ws:we], kv_cache=kv, start=ws).logits, shift)


def _block_positions(ws: int, width: int, lo: int, hi: int, device: torch.device) -> torch.Tensor:
    """[1, width] bool: which window columns lie in the block [lo, hi)."""
    pos = torch.arange(ws, ws + width, device=device)[None]
    return (pos >= lo) & (pos < hi)


def _select(conf: torch.Tensor, n: int, threshold: float | None) -> torch.Tensor:
    """Indices to commit in one row: the top ``n`` by confidence, or (threshold) those of the top
    ``n`` at or above it, the first always."""
    if n <= 0:
        return torch.empty(0, dtype=torch.long, device=conf.device)
    vals, idx = torch.topk(conf, n)
    if threshold is None:
        return idx
    keep = vals >= threshold
    keep[0] = True
    return idx[keep]


# --------------------------------------------------------------------------------------------
# LLaDA family


def _llada_transfer(
    logits: torch.Tensor, mask_index: torch.Tensor, xw: torch.Tensor, count: int, threshold: float | None,
    temperature: float, remasking: str, generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidates [1, W], indices to commit) for one step; Fast-dLLM's get_transfer_index."""
    from .generate import _rand

    if temperature > 0:  # Gumbel-max in float64, as LLaDA
        lg = logits.to(torch.float64)
        noise = _rand(lg.shape, generator, lg.device, torch.float64)
        x0 = torch.argmax(lg.exp() / (-torch.log(noise)) ** temperature, dim=-1)
    else:
        x0 = torch.argmax(logits, dim=-1)
    if remasking == "low_confidence":
        p = F.softmax(logits.to(torch.float64), dim=-1)  # float64 here, unlike LLaDA's own sampler
        conf = torch.gather(p, -1, x0[..., None]).squeeze(-1)
    else:  # random
        conf = _rand(x0.shape, generator, x0.device)
    x0 = torch.where(mask_index, x0, xw)
    conf = torch.where(mask_index, conf, torch.full_like(conf, NEG_INF))
    n = int(mask_index[0].sum()) if threshold is not None else count
    return x0, _select(conf[0], n, threshold)


def fast_llada(
    model: torch.nn.Module, x: torch.Tensor, *, p: int, gen_length: int, steps: int, block_length: int,
    temperature: float, remasking: str, cache: str | None, threshold: float | None, mask_id: int,
    shift: bool, generator: torch.Generator | None, trace: Trace | None, stats: DecodeStats | None,
    callback: Callable[[int, torch.Tensor], None] | None, stop_ids: torch.Tensor | None, fill_id: int,
) -> torch.Tensor:
    """Fast-dLLM's LLaDA loops on ``x`` [1, P + G] (prompt then masks), in place; returns x."""
    from .generate import (
        _fill_after_stop,
        _rand,
        _record_after,
        _rows_finished,
        num_transfer_tokens,
    )

    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    count = _Counter(stats, trace)
    length = x.shape[1]
    deterministic = temperature == 0 and remasking == "low_confidence"
    for b in range(num_blocks):
        lo, hi = p + b * block_length, p + (b + 1) * block_length
        counts = num_transfer_tokens((x[:, lo:hi] == mask_id).sum(1), steps_per_block)[0].tolist()
        kv: KVCache | None = None
        i = 0
        while True:
            if i == 0:
                logits, kv = _refresh(model, x, cache, shift)
                ws = 0
                if cache == "prefix" and kv is not None:
                    kv = kv.prefix(lo)
            else:
                ws, we = _window(length, lo, hi, cache)
                logits = _window_logits(model, x, ws, we, kv, shift)
                if cache == "prefix" and temperature > 0:
                    # Fast-dLLM's prefix loop draws (and discards) one extra Gumbel noise per step
                    _rand(logits.shape, generator, logits.device, torch.float64)
            count.tick()
            xw = x[:, ws:ws + logits.shape[1]]  # a view: commits below write into x
            _record_before(trace, x, logits, p, mask_id, ws)
            before = x.clone() if trace is not None else x
            mask_index = (xw == mask_id) & _block_positions(ws, xw.shape[1], lo, hi, x.device)
            k = counts[i] if i < len(counts) else 0
            x0, idx = _llada_transfer(logits, mask_index, xw, k, threshold, temperature, remasking, generator)
            xw[0, idx] = x0[0, idx]
            _record_after(trace, before, x, p, mask_id)
            if callback is not None:
                callback(count.n - 1, x)
            i += 1
            left = int((x[:, lo:hi] == mask_id).sum())
            if i == 1 and cache is not None and (threshold is not None or steps_per_block > 1):
                continue  # Fast-dLLM checks nothing after a cached block's step 0
            if left == 0:
                break
            if threshold is None and i >= steps_per_block:
                break  # the schedule is used up (only when [MASK] was committed; Fast-dLLM indexes past it)
            if threshold is not None and deterministic and left == int(mask_index.sum()):
                break  # every commit was [MASK]: Fast-dLLM would repeat this very step forever
        if stop_ids is not None and _rows_finished(x, p, mask_id, stop_ids):
            _fill_after_stop(x, p, mask_id, fill_id)
            break
    return x


# --------------------------------------------------------------------------------------------
# Dream family


def fast_dream(
    model: torch.nn.Module, x: torch.Tensor, *, p: int, gen_length: int, steps: int, block_length: int,
    temperature: float, top_p: float | None, top_k: int | None, alg_temp: float | None, eps: float,
    cache: str | None, threshold: float | None, mask_id: int, generator: torch.Generator | None,
    trace: Trace | None, stats: DecodeStats | None, callback: Callable[[int, torch.Tensor], None] | None,
    stop_ids: torch.Tensor | None, fill_id: int,
) -> torch.Tensor:
    """Fast-dLLM's Dream block sampler on ``x`` [1, P + G], in place; returns x."""
    from .generate import (
        _dream_candidates,
        _fill_after_stop,
        _record_after,
        _rows_finished,
        dream_timesteps,
    )

    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    ts = dream_timesteps(steps_per_block, eps, x.device)
    count = _Counter(stats, trace)
    length = x.shape[1]

    def after(before: torch.Tensor) -> None:
        _record_after(trace, before, x, p, mask_id)
        if callback is not None:
            callback(count.n - 1, x)

    for b in range(num_blocks):
        lo, hi = p + b * block_length, p + (b + 1) * block_length
        # refresh: whole sequence, cache filled, the block's first position committed
        logits, kv = _refresh(model, x, cache, True)
        count.tick()
        _record_before(trace, x, logits, p, mask_id)
        before = x.clone() if trace is not None else x
        _, x0 = _dream_candidates(logits[0], temperature, top_p, top_k, "maskgit_plus", generator)
        x[0, lo] = x0[lo]
        after(before)
        if cache == "prefix" and kv is not None:
            kv = kv.prefix(lo)
        i = 1
        while True:
            ws, we = _window(length, lo, hi, cache)
            logits = _window_logits(model, x, ws, we, kv, True)
            count.tick()
            xw = x[:, ws:we]
            _record_before(trace, x, logits, p, mask_id, ws)
            before = x.clone() if trace is not None else x
            in_block = _block_positions(ws, xw.shape[1], lo, hi, x.device)
            if threshold is not None:
                # every masked window position is scored (prefix: the suffix too), only the block commits
                mask_index = xw == mask_id
                conf, x0 = _dream_candidates(logits[mask_index], temperature, top_p, top_k, "maskgit_plus",
                                             generator)
                full = torch.full(xw.shape, NEG_INF, dtype=logits.dtype, device=x.device)
                full[mask_index] = conf
                full[~in_block] = NEG_INF
                cand = torch.full_like(xw, mask_id)
                cand[mask_index] = x0
                n_left = int((x[:, lo:hi] == mask_id).sum())
                idx = _select(full[0], n_left, threshold)
                xw[0, idx] = cand[0, idx]
                if n_left and temperature == 0 and int((x[:, lo:hi] == mask_id).sum()) == n_left:
                    after(before)
                    break  # every commit was [MASK]: Fast-dLLM would repeat this very step forever
            else:
                if i == steps_per_block:  # Dream's block loop stops here, masks left or not
                    after(before)
                    break
                t, s = ts[i], ts[i + 1]
                mask_index = (xw == mask_id) & in_block
                conf, x0 = _dream_candidates(logits[mask_index], temperature, top_p, top_k, "entropy", generator)
                nm = mask_index.sum().to(torch.float32)
                k = int(nm * (1 - s / t)) if i < steps_per_block - 1 else int(nm)
                if k > 0:
                    full = torch.full(xw.shape, NEG_INF, dtype=logits.dtype, device=x.device)
                    full[mask_index] = conf
                    if alg_temp is None or alg_temp == 0:
                        idx = torch.topk(full[0], k).indices
                    else:
                        w = F.softmax(full[0] / alg_temp, dim=-1)
                        gdev = generator.device if generator is not None else w.device
                        idx = torch.multinomial(w.to(gdev), k, generator=generator).to(x.device)
                    cand = torch.full_like(xw, mask_id)
                    cand[mask_index] = x0
                    xw[0, idx] = cand[0, idx]
                i += 1
            after(before)
            if not bool((x[:, lo:hi] == mask_id).any()):
                break
        if stop_ids is not None and _rows_finished(x, p, mask_id, stop_ids):
            _fill_after_stop(x, p, mask_id, fill_id)
            break
    return x
