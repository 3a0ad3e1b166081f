"""Reference for the Stage I statistics: one batch of rollouts accumulated step by step.

Not used by the package (``ProbeStats`` computes every spec from one pass); the tests compare it
with ``ProbeStats`` and check it on hand-made traces. It was ``calib.prior.accumulate_trace``.
"""

from __future__ import annotations

from typing import Any

import torch

from fair_calib_ext.calib.prior import _reliability, _row_normalised, lambda0


def accumulate_trace(trace: Any, f_acc: torch.Tensor, r_acc: torch.Tensor, *, lambda0_schedule: str = "early",
                     lambda0_rate: float = 3.0, reliability: str = "prob", vocab_size: int | None = None,
                     step_offset: int = 0, total_steps: int | None = None) -> None:
    """Add one batch of rollouts (a filled Trace) into F [G] and R [G] in place.

    ``trace.masked[t]``, ``commit[t]`` and the statistics are [B, G]. c̃ = c / mean(c over the
    row's masked positions) (rows with no masked position add nothing).
    """
    steps = total_steps or len(trace.masked)
    vocab = vocab_size or 2
    for t in range(len(trace.masked)):
        gstep = t + 1 + step_offset
        m = trace.masked[t].bool()
        c = trace.commit[t].bool()
        f_acc += lambda0(gstep, steps, lambda0_schedule, lambda0_rate) * c.float().sum(0)
        rel = _reliability(reliability, trace.prob[t].float(), trace.entropy[t].float(),
                           trace.margin[t].float(), vocab)
        r_acc += _row_normalised(rel, m.float()).sum(0)
