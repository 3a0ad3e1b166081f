"""Monte-Carlo ELBO likelihood of masked-diffusion LMs (LLaDA's estimator) and perplexity.

For a prefix x and a target y of length L (``reference/dllm_models.md`` §6, LLaDA Eq. 6):

    -log p(y | x) <= E_l [ (L / l) * Σ_{masked i} -log p(y_i | x, y with l tokens masked) ]

with l uniform on {1..L} and exactly l target tokens masked (chosen without replacement); the
prefix is never masked. The ``mc_num`` samples are stratified in l: l_j = round(k + j·L/mc_num)
wrapped into [1, L] with one random offset k, as LLaDA's ``get_log_likelihood`` does per batch.

Common random numbers: the masks of example ``index`` are drawn from a generator seeded by
``(seed, index)`` only, so a full-precision and a quantized model, any batch size and any
sharding across ranks see identical masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ElboResult",
    "example_generator",
    "elbo_masks",
    "mc_elbo_nll",
    "score_continuations",
    "text_pairs",
    "perplexity",
]


def example_generator(seed: int, index: int) -> torch.Generator:
    """CPU generator for example ``index`` under run seed ``seed`` (independent of batching)."""
    # large odd multiplier spreads (seed, index) pairs; mod 2**63 keeps it a valid seed
    return torch.Generator().manual_seed((seed * 1_000_003 + index * 7_919 + 12_345) % (2**63))


def elbo_masks(length: int, mc_num: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Stratified mask counts and masks for one target.

    Args:
        length: target length L ≥ 1.
        mc_num: number of Monte-Carlo samples.
        generator: source of randomness (CPU).
    Returns:
        (l LongTensor [mc_num] in [1, L], mask BoolTensor [mc_num, L] with exactly l_j Trues in row j)
    """
    if length < 1:
        raise ValueError(f"target length must be >= 1, got {length}")
    if mc_num < 1:
        raise ValueError(f"mc_num must be >= 1, got {mc_num}")
    k = int(torch.randint(1, length + 1, (1,), generator=generator))
    l = torch.linspace(k, k + (mc_num - 1) * length / mc_num, mc_num).round().long()
    l = (l - 1) % length + 1
    ranks = torch.rand(mc_num, length, generator=generator).argsort(dim=1).argsort(dim=1)
    return l, ranks < l.unsqueeze(1)


@torch.no_grad()
def mc_elbo_nll(
    model: Any,
    prefix: Sequence[int] | Tensor,
    target: Sequence[int] | Tensor,
    *,
    mc_num: int = 128,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
) -> float:
    """Monte-Carlo upper bound on -log p(target | prefix) in nats.

    ``model`` needs ``denoise_logits(input_ids [B, S]) -> [B, S, V]`` (position-aligned logits)
    and ``config.mask_token_id``. Dream models need a non-empty prefix (position 0 is never
    predicted after the logit shift).
    """
    prefix_t = torch.as_tensor(prefix, dtype=torch.long).flatten()
    target_t = torch.as_tensor(target, dtype=torch.long).flatten()
    L, P = target_t.numel(), prefix_t.numel()
    if L == 0:
        raise ValueError("target is empty")
    if getattr(model.config, "shift_logits", False) and P == 0:
        raise ValueError("Dream-family models need a non-empty prefix (position 0 is never predicted)")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    l, mask = elbo_masks(L, mc_num, gen)
    device = _device(model)
    seq = torch.cat([prefix_t, target_t]).to(device)
    tgt = target_t.to(device)
    mask_id = int(model.config.mask_token_id)
    total = 0.0
    for s in range(0, mc_num, batch_size):
        m = mask[s : s + batch_size].to(device)
        x = seq.unsqueeze(0).repeat(m.shape[0], 1)
        x[:, P:] = torch.where(m, torch.full_like(x[:, P:], mask_id), x[:, P:])
        logits = model.denoise_logits(x)[:, P:].float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.repeat(m.shape[0]), reduction="none")
        ce = (ce.view(m.shape) * m).sum(1)
        total += float((ce * (L / l[s : s + batch_size].to(device).double())).sum())
    return total / mc_num


def _device(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    return next(model.parameters()).device


@dataclass
class ElboResult:
    """Per-example NLL bounds (nats) with their example indices and target lengths."""

    index: list[int]
    nll: list[float]
    n_tokens: list[int]


def score_continuations(
    model: Any,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    mc_num: int = 128,
    batch_size: int = 32,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    max_length: int | None = None,
    progress: bool = False,
    desc: str = "mc-elbo",
) -> ElboResult:
    """MC-ELBO NLL for each (prefix_ids, target_ids) pair.

    ``indices`` are the global example indices (for common random numbers under sharding);
    default 0..N-1. ``max_length`` truncates prefixes from the left so prefix + target fit.
    """
    idx = list(indices) if indices is not None else list(range(len(pairs)))
    if len(idx) != len(pairs):
        raise ValueError(f"{len(idx)} indices for {len(pairs)} pairs")
    out = ElboResult(index=[], nll=[], n_tokens=[])
    it: Iterable = zip(idx, pairs)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(pairs), desc=desc, leave=False)
    for i, (prefix, target) in it:
        prefix = list(prefix)
        target = list(target)
        if max_length is not None and len(prefix) + len(target) > max_length:
            keep = max(max_length - len(target), 1)
            prefix = prefix[-keep:]
        nll = mc_elbo_nll(model, prefix, target, mc_num=mc_num, batch_size=batch_size,
                          generator=example_generator(seed, i))
        out.index.append(i)
        out.nll.append(nll)
        out.n_tokens.append(len(target))
    return out


def text_pairs(tokenizer: Any, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """(prefix, target) pairs for perplexity: the text's first token is the context and the rest
    is scored. Dream never predicts position 0, so this scores both families on the same tokens
    without feeding a start token the tiny models never saw in training."""
    pairs = []
    for t in texts:
        ids = [int(i) for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
        if len(ids) < 2:
            raise ValueError(f"text {t!r} has fewer than 2 tokens; nothing to score after the first")
        pairs.append((ids[:1], ids[1:]))
    return pairs


def perplexity(result: ElboResult) -> dict[str, float]:
    """exp(Σ NLL / Σ tokens) with the mean per-token NLL (nats); an upper bound (ELBO)."""
    n = sum(result.n_tokens)
    if n == 0:
        raise ValueError("no tokens scored")
    nll = sum(result.nll) / n
    return {"ppl": math.exp(nll), "nll_per_token": nll, "n_tokens": n, "n_texts": len(result.nll)}
