"""Masked-diffusion decoding for LLaDA and Dream models, with optional per-step tracing.

Two schedules, both written from the official algorithms:

* ``"llada"`` (LLaDA ``generate``): the generation region is split into blocks decoded left to
  right; each block gets ``steps / num_blocks`` steps and commits ``n // S`` tokens per step plus
  one more on the first ``n % S`` steps. Candidates come from argmax of the logits (T = 0) or of
  Gumbel-perturbed logits in float64 (T > 0); the positions committed are the top-k by
  confidence (``low_confidence``: softmax prob of the candidate; ``random``: uniform).
* ``"dream"`` (Dream ``diffusion_generate``): timesteps ``linspace(1, eps, steps + 1)`` in
  float32; at step i with t, s = ts[i], ts[i+1] it commits ``int(n_masked * (1 - s / t))``
  tokens (all that are left on the last step), chosen by ``entropy`` (negative entropy),
  ``margin`` (p1 − p2), ``maskgit_plus``/``low_confidence`` (candidate prob), ``random``, or
  ``origin`` (every masked slot independently with probability 1 − s/t). Temperature, top-p and
  top-k shape the candidate distribution *before* confidences are computed, as in Dream; top-k
  defaults to 50 there, as in the official code (see ``DREAM_DEFAULT_TOP_K``).

Both use aligned logits (Dream's raw logits shifted right by one). Commits are never undone.

``cache`` ("prefix" | "dual") and ``threshold`` switch to Fast-dLLM's loops instead (block-wise
approximate KV cache, confidence-threshold parallel commits): see :mod:`.fast`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..validate import check_float, check_int
from .trace import DecodeStats, Trace

__all__ = [
    "generate",
    "left_pad",
    "num_transfer_tokens",
    "dream_timesteps",
    "REMASKING",
    "DREAM_DEFAULT_TOP_K",
    "generation_defaults",
    "check_fast_settings",
    "CACHE_CHOICES",
]

CACHE_CHOICES = (None, "prefix", "dual")

REMASKING = ("low_confidence", "random", "margin", "entropy", "maskgit_plus", "origin")
# Dream's diffusion_generate builds its generation config from the model config, which in
# transformers 4.x carries PretrainedConfig's top_k = 50 (and top_p = 1.0): unless the caller or
# the checkpoint sets top_k, the official sampler truncates to the 50 largest logits before the
# confidence (entropy, margin, ...) is computed and before sampling.
DREAM_DEFAULT_TOP_K = 50
_ALIASES = {"topk_margin": "margin"}


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to a common length: (ids [B, P] long, attention_mask [B, P] long)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    p = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), p), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), p), dtype=torch.long)
    for i, x in enumerate(prompts):
        ids[i, p - len(x):] = torch.as_tensor(list(x), dtype=torch.long)
        mask[i, p - len(x):] = 1
    return ids, mask


def num_transfer_tokens(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's per-step commit counts [B, steps] for a block with ``n_masked`` [B] masks."""
    base = n_masked // steps
    rem = n_masked % steps
    out = base[:, None].expand(-1, steps).clone()
    out += (torch.arange(steps, device=n_masked.device)[None, :] < rem[:, None]).long()
    return out


def dream_timesteps(steps: int, eps: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Dream's float32 schedule linspace(1, eps, steps + 1)."""
    return torch.linspace(1, eps, steps + 1, device=device)


def generation_defaults(model: torch.nn.Module) -> dict[str, Any]:
    """The checkpoint's generation_config.json (attached by load_pretrained), or {}."""
    cfg = getattr(model, "generation_config", None)
    return dict(cfg) if isinstance(cfg, dict) else {}


# --------------------------------------------------------------------------------------------
# helpers shared by both schedules


def _forward(
    model: torch.nn.Module,
    x: torch.Tensor,
    attn: torch.Tensor | None,
    cfg_scale: float,
    uncond_positions: torch.Tensor,
    mask_id: int,
    shift: bool,
) -> torch.Tensor:
    """Aligned logits [B, L, V]; with CFG the unconditional copy has the prompt masked and both
    run as one batch: un + (w + 1) * (cond - un)."""
    if cfg_scale > 0:
        un = x.masked_fill(uncond_positions, mask_id)
        xx = torch.cat([x, un], dim=0)
        aa = torch.cat([attn, attn], dim=0) if attn is not None else None
        logits = model(xx, attention_mask=aa).logits
        cond, unc = logits.chunk(2, dim=0)
        logits = unc + (cfg_scale + 1) * (cond - unc)
    else:
        logits = model(x, attention_mask=attn).logits
    if shift:
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    return logits


def _stats(logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """top1, prob, entropy, margin of softmax(logits) in fp32; logits [B, G, V]."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    p = lp.exp()
    top2 = p.topk(2, dim=-1)
    ent = -(p * lp).nan_to_num(0.0).sum(-1)
    return top2.indices[..., 0], top2.values[..., 0], ent, top2.values[..., 0] - top2.values[..., 1]


def _record_before(trace: Trace | None, x: torch.Tensor, logits: torch.Tensor, p: int, mask_id: int,
                   ws: int = 0) -> None:
    """The step's canvas, mask and (record_stats) per-position stats, before it commits.

    ``logits`` cover positions [ws, ws + W) (the whole sequence for the default samplers; a
    cached window for Fast-dLLM's); generated positions outside it get NaN / -1 stats."""
    if trace is None:
        return
    region = x[:, p:]
    trace.canvas.append(region.cpu().clone())
    trace.masked.append((region == mask_id).cpu())
    if trace.record_stats:
        b, g = region.shape
        top1 = torch.full((b, g), -1, dtype=torch.long)
        prob, ent, margin = (torch.full((b, g), float("nan")) for _ in range(3))
        a, e = max(ws, p), ws + logits.shape[1]
        if e > a:
            t1, pr, en, mg = _stats(logits[:, a - ws:e - ws])
            top1[:, a - p:e - p], prob[:, a - p:e - p] = t1.cpu(), pr.cpu()
            ent[:, a - p:e - p], margin[:, a - p:e - p] = en.cpu(), mg.cpu()
        trace.top1.append(top1)
        trace.prob.append(prob)
        trace.entropy.append(ent)
        trace.margin.append(margin)


def _record_after(trace: Trace | None, before: torch.Tensor, x: torch.Tensor, p: int, mask_id: int) -> None:
    if trace is None:
        return
    region = x[:, p:]
    commit = (before[:, p:] == mask_id) & (region != mask_id)
    trace.commit.append(commit.cpu())
    trace.tokens.append(torch.where(commit, region, torch.full_like(region, mask_id)).cpu())
    trace.steps = len(trace.canvas)


def _rows_finished(x: torch.Tensor, p: int, mask_id: int, stop_ids: torch.Tensor) -> bool:
    """True when every row has a stop token in its generation region with no mask before it."""
    region = x[:, p:]
    is_stop = torch.isin(region, stop_ids)
    if not bool(is_stop.any(1).all()):
        return False
    first = is_stop.float().argmax(1)  # index of the first stop token per row
    pos = torch.arange(region.shape[1], device=x.device)[None]
    masked_before = ((region == mask_id) & (pos < first[:, None])).any(1)
    return not bool(masked_before.any())


def _fill_after_stop(x: torch.Tensor, p: int, mask_id: int, fill_id: int) -> None:
    region = x[:, p:]
    region.masked_fill_(region == mask_id, fill_id)


def _rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # draw on the generator's device, then move: CPU generators cannot fill CUDA tensors
    gdev = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=gdev, dtype=dtype).to(device)


# --------------------------------------------------------------------------------------------
# LLaDA block schedule


def _confidence_llada(
    logits: torch.Tensor, x0: torch.Tensor, remasking: str, generator: torch.Generator | None
) -> torch.Tensor:
    if remasking in ("low_confidence", "maskgit_plus"):
        # model dtype, as the current official generate() does
        return torch.gather(F.softmax(logits, dim=-1), -1, x0[..., None]).squeeze(-1)
    if remasking == "random":
        return _rand(x0.shape, generator, x0.device)
    p = F.softmax(logits, dim=-1)
    if remasking == "margin":
        top2 = p.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if remasking == "entropy":
        return (p * torch.log(p + 1e-10)).sum(-1)
    raise ValueError(f"remasking={remasking!r} is not available with the llada schedule")


def _generate_llada(
    model, x, attn, *, p, gen_length, steps, block_length, temperature, remasking, cfg_scale,
    trace, generator, mask_id, shift, stop_ids, fill_id, logits_eos_inf, confidence_eos_eot_inf,
    eos_id, eot_id, callback,
) -> torch.Tensor:
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    prompt_positions = x != mask_id  # CFG masks these (the prompt, pads included) in the uncond copy
    neg_inf = float("-inf")
    t_global = 0
    for b in range(num_blocks):
        lo, hi = p + b * block_length, p + (b + 1) * block_length
        counts = num_transfer_tokens((x[:, lo:hi] == mask_id).sum(1), steps_per_block)
        for s in range(steps_per_block):
            mask_index = x == mask_id
            logits = _forward(model, x, attn, cfg_scale, prompt_positions, mask_id, shift)
            if logits_eos_inf and eos_id is not None:
                logits[..., eos_id] = neg_inf
            _record_before(trace, x, logits, p, mask_id)
            if temperature > 0:
                lg = logits.to(torch.float64)
                noise = _rand(lg.shape, generator, lg.device, torch.float64)
                x0 = torch.argmax(lg.exp() / (-torch.log(noise)) ** temperature, dim=-1)
            else:
                x0 = torch.argmax(logits, dim=-1)
            if confidence_eos_eot_inf:
                # the official code blanks EoT in the logits and EOS in the (noised) logits after
                # the argmax; at T = 0 those are the same tensor, so both count
                if eot_id is not None:
                    logits[..., eot_id] = neg_inf
                if temperature == 0 and eos_id is not None:
                    logits[..., eos_id] = neg_inf
            conf = _confidence_llada(logits, x0, remasking, generator)
            conf[:, hi:] = neg_inf
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, conf, torch.full_like(conf, neg_inf))
            before = x.clone() if trace is not None else x
            for j in range(x.shape[0]):
                k = int(counts[j, s])
                if k > 0:
                    idx = torch.topk(conf[j], k=k).indices
                    x[j, idx] = x0[j, idx]
            _record_after(trace, before, x, p, mask_id)
            if callback is not None:
                callback(t_global, x)
            t_global += 1
        if stop_ids is not None and _rows_finished(x, p, mask_id, stop_ids):
            _fill_after_stop(x, p, mask_id, fill_id)
            break
    return x


# --------------------------------------------------------------------------------------------
# Dream timestep schedule


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    drop = cum > top_p
    drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses the threshold
    drop[..., 0] = False
    mask = torch.zeros_like(drop).scatter_(-1, order, drop)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def _top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def _dream_candidates(
    logits: torch.Tensor, temperature: float, top_p: float | None, top_k: int | None,
    remasking: str, generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence [N], x0 [N]) for masked rows ``logits`` [N, V], as Dream's sample_tokens."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = _top_p(logits, top_p)
    if top_k:  # None or 0: the full distribution
        logits = _top_k(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0 and probs.shape[0] > 0:
        norm = probs / probs.sum(-1, keepdim=True)  # what torch.distributions.Categorical samples from
        gdev = generator.device if generator is not None else probs.device
        x0 = torch.multinomial(norm.to(gdev), 1, True, generator=generator).squeeze(-1).to(probs.device)
        conf = torch.gather(probs, -1, x0[:, None]).squeeze(-1)
    else:
        conf, x0 = probs.max(dim=-1)
    if remasking == "margin":
        top2 = torch.sort(probs, dim=-1, descending=True).values
        conf = top2[:, 0] - top2[:, 1]
    elif remasking == "entropy":
        conf = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    elif remasking == "random":
        conf = _rand(conf.shape, generator, conf.device).to(conf.dtype)
    return conf, x0


def _generate_dream(
    model, x, attn, *, p, steps, temperature, remasking, cfg_scale, trace, generator, mask_id, shift,
    top_p, top_k, alg_temp, eps, stop_ids, fill_id, callback,
) -> torch.Tensor:
    ts = dream_timesteps(steps, eps, x.device)
    prompt_positions = x != mask_id
    for i in range(steps):
        mask_index = x == mask_id
        logits = _forward(model, x, attn, cfg_scale, prompt_positions, mask_id, shift)
        _record_before(trace, x, logits, p, mask_id)
        before = x.clone() if trace is not None else x
        mask_logits = logits[mask_index]
        t, s = ts[i], ts[i + 1]
        last = i == steps - 1
        if remasking == "origin":
            p_transfer = 1 - s / t if not last else 1.0
            x0 = torch.full((mask_logits.shape[0],), mask_id, dtype=torch.long, device=x.device)
            move = _rand(x0.shape, generator, x.device) < p_transfer
            if bool(move.any()):
                _, x0[move] = _dream_candidates(mask_logits[move], temperature, top_p, top_k, "maskgit_plus", generator)
            x[mask_index] = x0
        else:
            conf, x0 = _dream_candidates(mask_logits, temperature, top_p, top_k, remasking, generator)
            full_conf = torch.full(x.shape, float("-inf"), dtype=logits.dtype, device=x.device)
            full_conf[mask_index] = conf
            cand = torch.full_like(x, mask_id)
            cand[mask_index] = x0
            n_masked = mask_index.sum(1)
            for j in range(x.shape[0]):
                # Dream divides the batch total by B; per row is the same for equal counts and
                # never re-masks decoded slots when counts differ
                nm = n_masked[j].to(torch.float32)
                k = int(nm * (1 - s / t)) if not last else int(nm)
                if k <= 0:
                    continue
                if alg_temp is None or alg_temp == 0:
                    idx = torch.topk(full_conf[j], k).indices
                else:
                    w = F.softmax(full_conf[j] / alg_temp, dim=-1)
                    gdev = generator.device if generator is not None else w.device
                    idx = torch.multinomial(w.to(gdev), k, generator=generator).to(x.device)
                x[j, idx] = cand[j, idx]
        _record_after(trace, before, x, p, mask_id)
        if callback is not None:
            callback(i, x)
        if stop_ids is not None and not last and _rows_finished(x, p, mask_id, stop_ids):
            _fill_after_stop(x, p, mask_id, fill_id)
            break
    return x


# --------------------------------------------------------------------------------------------


def check_fast_settings(cache: str | None, threshold: float | None) -> None:
    """Raise ValueError unless ``cache`` is None/"prefix"/"dual" and ``threshold`` None or in (0, 1]."""
    if cache not in CACHE_CHOICES:
        raise ValueError(f"cache must be None, 'prefix' or 'dual', got {cache!r}")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ValueError(f"threshold must be a number in (0, 1] or None, got {threshold!r}")
        if not (0.0 < float(threshold) <= 1.0):  # NaN fails this too
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")


def _generate_fast(
    model, prompt_ids, attention_mask, *, family, gen_length, steps, block_length, temperature, remasking,
    cache, threshold, trace, stats, generator, mask_id, shift, top_p, top_k, alg_temp, eps, stop_ids,
    fill_id, callback,
) -> torch.Tensor:
    """Fast-dLLM's loops (batch 1), row by row over a left-padded batch."""
    from . import fast

    b, p = prompt_ids.shape
    device = prompt_ids.device
    out = torch.full((b, p + gen_length), mask_id, dtype=torch.long, device=device)
    out[:, :p] = prompt_ids
    for r in range(b):
        keep = attention_mask[r].bool() if attention_mask is not None else torch.ones(p, dtype=torch.bool,
                                                                                     device=device)
        row = prompt_ids[r][keep]
        n = row.shape[0]
        x = torch.full((1, n + gen_length), mask_id, dtype=torch.long, device=device)
        x[0, :n] = row
        if trace is not None:
            trace.prompt_len = n
        row_callback = None
        if callback is not None:
            def row_callback(t: int, xr: torch.Tensor, r: int = r, n: int = n) -> None:
                out[r, p:] = xr[0, n:]  # the caller sees its own layout: [1, P + G], padding kept
                callback(t, out[r:r + 1])
        common: dict[str, Any] = {
            "p": n, "gen_length": gen_length, "steps": steps, "block_length": block_length,
            "temperature": temperature, "cache": cache, "threshold": threshold, "mask_id": mask_id,
            "generator": generator, "trace": trace, "stats": stats, "callback": row_callback,
            "stop_ids": stop_ids, "fill_id": fill_id,
        }
        if family == "dream":
            fast.fast_dream(model, x, top_p=top_p, top_k=top_k, alg_temp=alg_temp, eps=eps, **common)
        else:
            fast.fast_llada(model, x, remasking=remasking, shift=shift, **common)
        out[r, p:] = x[0, n:]
    return out


def _check_optional(top_p: float | None, alg_temp: float | None, eps: float | None) -> None:
    """Dream's optional floats, when given: top_p in (0, 1], alg_temp >= 0, eps in (0, 1]."""
    if top_p is not None:
        check_float(top_p, "top_p", lo=0.0, hi=1.0, lo_open=True)
    if alg_temp is not None:
        check_float(alg_temp, "alg_temp", lo=0.0)
    if eps is not None:
        check_float(eps, "eps", lo=0.0, hi=1.0, lo_open=True)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    *,
    gen_length: int,
    steps: int,
    block_length: int | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    trace: Trace | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    schedule: str | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    alg_temp: float | None = None,
    eps: float | None = None,
    stop_at_eos: bool = False,
    stop_token_ids: Sequence[int] | None = None,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    eot_token_id: int | None = None,
    mask_token_id: int | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    cache: str | None = None,
    threshold: float | None = None,
    stats: DecodeStats | None = None,
) -> torch.Tensor:
    """Decode ``gen_length`` tokens after ``prompt_ids`` [B, P]; returns ids [B, P + G].

    Prompts of different lengths are left-padded to P (see :func:`left_pad`) with
    ``attention_mask`` [B, P] marking real tokens. ``schedule`` is "llada" (blocks) or "dream"
    (timesteps); by default a Dream model with ``block_length=None`` uses "dream", anything
    else "llada" (where ``block_length=None`` means one block of ``gen_length``).

    ``remasking``: low_confidence | random | margin | entropy (both schedules), maskgit_plus
    (= low_confidence) and origin (dream only). ``top_p``/``top_k``/``alg_temp``/``eps`` (dream
    schedule) default to the checkpoint's generation_config.json, then to the official Dream
    defaults (None, 50, None, 1e-3). ``top_k = 50`` is what Dream's ``diffusion_generate``
    inherits from transformers' model-config default: the logits are cut to the 50 largest
    *before* the confidence (e.g. the entropy) is computed, which changes which positions
    commit. ``top_k=0`` (or ``"top_k": null`` in generation_config.json) keeps the full
    distribution. ``temperature`` > 0 samples (LLaDA: Gumbel-max in float64);
    randomness comes from ``generator`` (or the global RNG when None).

    ``stop_at_eos``: once a block completes (dream schedule: after any step) and every row has
    a stop token (``stop_token_ids``, default EOS plus ``eot_token_id``) with nothing masked
    before it, stop and fill the remaining masks with EOS. ``logits_eos_inf`` /
    ``confidence_eos_eot_inf`` are the official LLaDA flags. ``trace`` records every step
    (see :class:`Trace`); ``callback(step, x)`` runs after each step; ``stats`` (a
    :class:`DecodeStats`) receives the number of forward passes (NFE) and steps.

    Fast decoding (Fast-dLLM, see :mod:`fair_calib_ext.sampling.fast`): ``cache`` is None,
    "prefix" or "dual" (block-wise approximate KV cache) and ``threshold`` None or in (0, 1]
    (commit every masked position of the block whose confidence reaches it, at least one per
    step). Either one switches to Fast-dLLM's loop for the model family: LLaDA's
    ``generate`` / ``generate_with_prefix_cache`` / ``generate_with_dual_cache`` (remasking
    low_confidence or random; ``block_length=None`` is one block), Dream's block sampler
    (needs ``block_length``; remasking "entropy", replaced by the threshold rule when one is
    given; top_p/top_k/alg_temp/eps as for the dream schedule). Without a cache each step runs
    the whole sequence. Batch 1 as in Fast-dLLM: a batch is decoded row by row (its padding
    dropped per row; ``callback`` then sees the row being decoded, [1, P + G] with its padding,
    and ``trace`` needs B = 1). Not with
    ``cfg_scale``, ``schedule``, ``logits_eos_inf`` or ``confidence_eos_eot_inf``.
    ``cache=None, threshold=None`` is the sampler above, unchanged.
    """
    cfg = model.config
    mask_id = int(mask_token_id if mask_token_id is not None else cfg.mask_token_id)
    shift = bool(getattr(cfg, "shift_logits", False))
    family = getattr(cfg, "family", "llada")
    remasking = _ALIASES.get(remasking, remasking)
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING} (or 'topk_margin'), got {remasking!r}")
    check_fast_settings(cache, threshold)
    fast = cache is not None or threshold is not None
    if fast:
        what = "cache/threshold (Fast-dLLM decoding)"
        if schedule is not None:
            raise ValueError(f"{what}: schedule does not apply (the loop follows the model family), "
                             f"got schedule={schedule!r}")
        if cfg_scale:
            raise ValueError(f"{what} does not support cfg_scale > 0")
        if logits_eos_inf or confidence_eos_eot_inf:
            raise ValueError(f"{what} does not support logits_eos_inf / confidence_eos_eot_inf")
        if family == "dream":
            if block_length is None:
                raise ValueError(f"{what} on a Dream model needs block_length (Fast-dLLM's block sampler; "
                                 "cache and threshold need block-wise decoding)")
            if remasking != "entropy":
                raise ValueError(f"{what} on a Dream model: remasking must be 'entropy' (the block sampler's "
                                 f"rule; a threshold replaces it), got {remasking!r}")
        else:
            remasking = "low_confidence" if remasking == "maskgit_plus" else remasking
            if remasking not in ("low_confidence", "random"):
                raise ValueError(f"{what} on a LLaDA model: remasking must be 'low_confidence' or 'random', "
                                 f"got {remasking!r}")
        if trace is not None and prompt_ids.dim() == 2 and prompt_ids.shape[0] > 1:
            raise ValueError(f"{what}: trace needs a batch of one prompt (rows are decoded one by one)")
        schedule = "llada"  # block-wise; only for the shared checks below
    if schedule is None:
        schedule = "dream" if (family == "dream" and block_length is None) else "llada"
    if schedule not in ("llada", "dream"):
        raise ValueError(f"schedule must be 'llada' or 'dream', got {schedule!r}")

    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be [B, P] with P >= 1, got shape {tuple(prompt_ids.shape)}")
    vocab = getattr(cfg, "vocab_size", None)
    if prompt_ids.is_floating_point() or prompt_ids.is_complex() or prompt_ids.dtype == torch.bool or (
            vocab is not None and not bool(((prompt_ids >= 0) & (prompt_ids < vocab)).all())):
        raise ValueError(f"prompt_ids must be integer token ids in [0, {vocab}), got {prompt_ids.dtype} values in "
                         f"[{prompt_ids.min().item()}, {prompt_ids.max().item()}]")
    # every step commits at least one token, so steps > gen_length cannot help (and a huge value
    # never returns); NaN/inf temperatures or scales would decode garbage without an error
    gen_length = check_int(gen_length, "gen_length", lo=1)
    steps = check_int(steps, "steps", lo=1, hi=gen_length)
    temperature = check_float(temperature, "temperature", lo=0.0)
    cfg_scale = check_float(cfg_scale, "cfg_scale", lo=0.0)
    _check_optional(top_p, alg_temp, eps)
    b, p = prompt_ids.shape
    max_len = getattr(cfg, "max_position_embeddings", None)
    if max_len is not None and p + gen_length > max_len:
        raise ValueError(f"prompt ({p}) + gen_length ({gen_length}) = {p + gen_length} exceeds the "
                         f"model's context of {max_len} tokens")
    if schedule == "llada":
        if block_length is None:
            block_length = gen_length
        if block_length <= 0 or gen_length % block_length != 0:
            raise ValueError(f"gen_length ({gen_length}) must be divisible by block_length ({block_length})")
        num_blocks = gen_length // block_length
        if steps % num_blocks != 0:
            raise ValueError(f"steps ({steps}) must be divisible by the number of blocks ({num_blocks})")
        if remasking == "origin":
            raise ValueError("remasking='origin' needs the dream schedule (schedule='dream')")
        if (top_p is not None or top_k is not None or alg_temp is not None) and not (fast and family == "dream"):
            raise ValueError("top_p, top_k and alg_temp apply to the dream schedule only")
    if schedule == "dream" or (fast and family == "dream"):
        if block_length is not None and not fast:
            raise ValueError("the dream schedule has no blocks; pass block_length=None")
        defaults = generation_defaults(model)
        top_p = top_p if top_p is not None else defaults.get("top_p")
        if top_k is None:  # the checkpoint's value (null disables it), else Dream's official 50
            top_k = defaults["top_k"] if "top_k" in defaults else DREAM_DEFAULT_TOP_K
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be an int >= 0 (0: no truncation), got {top_k!r}")
        alg_temp = alg_temp if alg_temp is not None else defaults.get("alg_temp")
        eps = eps if eps is not None else defaults.get("eps", 1e-3)

    device = next(model.parameters()).device
    prompt_ids = prompt_ids.to(device)
    x = torch.full((b, p + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :p] = prompt_ids
    attn = None
    if attention_mask is not None:
        if attention_mask.shape != prompt_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != prompt_ids shape "
                             f"{tuple(prompt_ids.shape)}")
        attention_mask = attention_mask.to(device)
        if not bool(attention_mask.bool().all()):
            attn = torch.cat([attention_mask.long(), torch.ones(b, gen_length, dtype=torch.long, device=device)], 1)

    eos_id = getattr(cfg, "eos_token_id", None)
    stop_ids = None
    fill_id = eos_id if eos_id is not None else mask_id
    if stop_at_eos:
        ids = list(stop_token_ids) if stop_token_ids is not None else [
            i for i in (eos_id, eot_token_id) if i is not None]
        if not ids:
            raise ValueError("stop_at_eos needs stop_token_ids (the config has no eos_token_id)")
        stop_ids = torch.tensor(ids, dtype=torch.long, device=device)
        fill_id = ids[0]

    if trace is not None:
        trace.reset()
        trace.prompt_len, trace.gen_length = p, gen_length
        trace.block_length = block_length
        trace.schedule, trace.remasking, trace.mask_token_id = schedule, remasking, mask_id
        trace.cache, trace.threshold = cache, threshold

    if fast:
        if trace is not None:
            trace.schedule = f"fast-{family}"
        out = _generate_fast(
            model, prompt_ids, attention_mask, family=family, gen_length=gen_length, steps=steps,
            block_length=block_length, temperature=temperature, remasking=remasking, cache=cache,
            threshold=None if threshold is None else float(threshold), trace=trace, stats=stats,
            generator=generator, mask_id=mask_id, shift=shift, top_p=top_p, top_k=top_k, alg_temp=alg_temp,
            eps=float(eps) if eps is not None else 1e-3, stop_ids=stop_ids, fill_id=fill_id, callback=callback,
        )
        if trace is not None:
            trace.steps = len(trace.canvas)
        return out

    if stats is not None or trace is not None:  # the default loops run one forward per step
        user_callback = callback

        def callback(t: int, xx: torch.Tensor) -> None:
            if stats is not None:
                stats.nfe += 1
                stats.steps += 1
            if trace is not None:
                trace.nfe += 1
            if user_callback is not None:
                user_callback(t, xx)

    if schedule == "llada":
        return _generate_llada(
            model, x, attn, p=p, gen_length=gen_length, steps=steps, block_length=block_length,
            temperature=temperature, remasking=remasking, cfg_scale=cfg_scale, trace=trace,
            generator=generator, mask_id=mask_id, shift=shift, stop_ids=stop_ids, fill_id=fill_id,
            logits_eos_inf=logits_eos_inf, confidence_eos_eot_inf=confidence_eos_eot_inf,
            eos_id=eos_id, eot_id=eot_token_id, callback=callback,
        )
    return _generate_dream(
        model, x, attn, p=p, steps=steps, temperature=temperature, remasking=remasking,
        cfg_scale=cfg_scale, trace=trace, generator=generator, mask_id=mask_id, shift=shift,
        top_p=top_p, top_k=top_k, alg_temp=alg_temp, eps=float(eps), stop_ids=stop_ids,
        fill_id=fill_id, callback=callback,
    )
