"""Run a rollout and, at every step, the companion models on the very same state.

:class:`StepRecorder` stands in for the rolling model inside ``sampling.generate``: each call
forwards to the rolling model and also runs each companion model once on the same input, then
keeps per-position statistics of the generation region (top-1, margin, KL both ways, probability
MSE). So a teacher-forced comparison costs one extra forward per step and companion, batched
over the prompts, and nothing of size vocab is kept between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["StepRecorder", "ProbeRun", "rollout_with_probes", "pair_stats"]


def _aligned(model: Any, logits: Tensor) -> Tensor:
    """Raw logits -> position-aligned logits (Dream shift) for a model called via forward()."""
    if getattr(model.config, "shift_logits", False):
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    return logits


@torch.no_grad()
def pair_stats(a_logits: Tensor, b_logits: Tensor, chunk: int = 8) -> dict[str, Tensor]:
    """Per-position comparison of two logit tensors [B, G, V] (computed in fp32, row chunks).

    Returns [B, G] tensors: a_top1, b_top1, a_margin (p1 - p2 of a), kl_ab = KL(a ‖ b),
    kl_ba = KL(b ‖ a), mse = Σ_v (p_a - p_b)².
    """
    if a_logits.shape != b_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(a_logits.shape)} vs {tuple(b_logits.shape)}")
    parts: dict[str, list[Tensor]] = {k: [] for k in ("a_top1", "b_top1", "a_margin", "kl_ab", "kl_ba", "mse")}
    for s in range(0, a_logits.shape[0], chunk):
        la = torch.log_softmax(a_logits[s : s + chunk].float(), -1)
        lb = torch.log_softmax(b_logits[s : s + chunk].float(), -1)
        pa, pb = la.exp(), lb.exp()
        top2 = pa.topk(min(2, pa.shape[-1]), dim=-1).values
        parts["a_top1"].append(la.argmax(-1))
        parts["b_top1"].append(lb.argmax(-1))
        parts["a_margin"].append(top2[..., 0] - (top2[..., 1] if top2.shape[-1] > 1 else 0.0))
        parts["kl_ab"].append((pa * (la - lb)).sum(-1).clamp(min=0.0))
        parts["kl_ba"].append((pb * (lb - la)).sum(-1).clamp(min=0.0))
        parts["mse"].append(((pa - pb) ** 2).sum(-1))
    return {k: torch.cat(v).cpu() for k, v in parts.items()}


@dataclass
class _Companion:
    model: Any
    top1: list[Tensor] = field(default_factory=list)
    kl_roller_other: list[Tensor] = field(default_factory=list)  # KL(roller ‖ companion)
    kl_other_roller: list[Tensor] = field(default_factory=list)  # KL(companion ‖ roller)
    mse: list[Tensor] = field(default_factory=list)


class StepRecorder:
    """Wraps the rolling model for ``sampling.generate``; records every forward step.

    Attribute access falls through to the rolling model (config, device, parameters, ...).
    Both call styles are intercepted: ``model(input_ids, attention_mask=...)`` (raw logits,
    aligned here for the comparison) and ``model.denoise_logits(...)``.
    """

    def __init__(self, roller: Any, companions: Sequence[Any], gen_length: int) -> None:
        self._roller = roller
        self._companions = [_Companion(m) for m in companions]
        self._gen_length = int(gen_length)
        self.top1: list[Tensor] = []
        self.margin: list[Tensor] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._roller, name)

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kw: Any) -> Any:
        out = self._roller(input_ids, attention_mask=attention_mask, **kw)
        self._record(input_ids, attention_mask, _aligned(self._roller, out.logits))
        return out

    forward = __call__

    def denoise_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kw: Any) -> Tensor:
        logits = self._roller.denoise_logits(input_ids, attention_mask, **kw)
        self._record(input_ids, attention_mask, logits)
        return logits

    @torch.no_grad()
    def _record(self, input_ids: Tensor, attention_mask: Tensor | None, logits: Tensor) -> None:
        G = self._gen_length
        roller = logits[:, -G:]
        first = True
        for c in self._companions:
            other = c.model.denoise_logits(input_ids, attention_mask)[:, -G:]
            st = pair_stats(roller, other)
            if first:
                self.top1.append(st["a_top1"])
                self.margin.append(st["a_margin"])
                first = False
            c.top1.append(st["b_top1"])
            c.kl_roller_other.append(st["kl_ab"])
            c.kl_other_roller.append(st["kl_ba"])
            c.mse.append(st["mse"])
        if first:  # no companions: the roller's own statistics only
            st = pair_stats(roller, roller)
            self.top1.append(st["a_top1"])
            self.margin.append(st["a_margin"])

    def stacked(self) -> dict[str, Any]:
        """[T, B, G] tensors: roller top1/margin and, per companion, top1, KLs and MSE."""
        return {
            "top1": torch.stack(self.top1),
            "margin": torch.stack(self.margin),
            "companions": [
                {
                    "top1": torch.stack(c.top1),
                    "kl_roller_other": torch.stack(c.kl_roller_other),
                    "kl_other_roller": torch.stack(c.kl_other_roller),
                    "mse": torch.stack(c.mse),
                }
                for c in self._companions
            ],
        }


@dataclass
class ProbeRun:
    """One rollout: output ids, the Trace tensors [T, B, G] and the recorder's statistics."""

    output: Tensor
    commit: Tensor
    tokens: Tensor
    masked: Tensor
    stats: dict[str, Any]


def rollout_with_probes(
    roller: Any,
    companions: Sequence[Any],
    prompt_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    gen_kwargs: dict[str, Any],
) -> ProbeRun:
    """Decode ``prompt_ids`` with ``roller`` (a Trace records the steps) while each companion is
    run on every state the roller sees. ``gen_kwargs`` go to ``sampling.generate`` and must hold
    ``gen_length`` and ``steps``; the comparison assumes one forward per step (no CFG)."""
    from fair_calib_ext.sampling import Trace, generate

    if float(gen_kwargs.get("cfg_scale", 0.0) or 0.0) != 0.0:
        raise ValueError("mechanism metrics need one forward per step: use cfg_scale=0")
    rec = StepRecorder(roller, companions, gen_kwargs["gen_length"])
    trace = Trace()
    kwargs = dict(gen_kwargs)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    out = generate(rec, prompt_ids, trace=trace, **kwargs)
    commit = trace.stacked("commit")
    if len(rec.top1) != commit.shape[0]:
        raise RuntimeError(
            f"the sampler made {len(rec.top1)} model calls for {commit.shape[0]} traced steps; "
            "mechanism metrics need exactly one forward per step"
        )
    return ProbeRun(
        output=out.cpu(),
        commit=commit.cpu().bool(),
        tokens=trace.stacked("tokens").cpu().long(),
        masked=trace.stacked("masked").cpu().bool(),
        stats=rec.stacked(),
    )
