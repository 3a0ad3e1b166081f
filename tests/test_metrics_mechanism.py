"""Mechanism metrics with the real sampler on tiny random models, checked against a brute-force
teacher-forced replay."""

from __future__ import annotations

import pytest
import torch

from fair_calib_ext.metrics import mechanism_records, merge_records, rollout_with_probes, summarize_mechanism
from fair_calib_ext.models.testing import tiny_model

GEN = {"llada": dict(gen_length=8, steps=8, block_length=4, remasking="low_confidence"),
       "dream": dict(gen_length=8, steps=8, block_length=None, remasking="entropy")}


class CountingModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.calls = 0

    def forward(self, *a, **k):
        self.calls += 1
        return self.inner(*a, **k)

    def denoise_logits(self, *a, **k):
        self.calls += 1
        return self.inner.denoise_logits(*a, **k)


def _prompts(vocab: int, b: int = 3, p: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab - 2, (b, p), generator=g)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_recorder_matches_sampler_and_brute_force_replay(family):
    teacher = tiny_model(family, seed=0)
    other = CountingModel(tiny_model(family, seed=1))
    x = _prompts(teacher.config.vocab_size)
    run = rollout_with_probes(teacher, [other], x, gen_kwargs=GEN[family])
    T = run.commit.shape[0]
    # one companion forward per step
    assert other.calls == T
    # the recorder's view of the teacher agrees with the sampler's own trace statistics
    from fair_calib_ext.sampling import Trace, generate

    tr = Trace()
    out = generate(teacher, x, trace=tr, **GEN[family])
    assert torch.equal(out.cpu(), run.output)
    assert torch.equal(tr.stacked("top1"), run.stats["top1"])
    assert torch.allclose(tr.stacked("margin"), run.stats["margin"], atol=1e-6)
    # brute force: feed each stored teacher canvas to the other model
    comp = run.stats["companions"][0]
    canvas = tr.stacked("canvas")
    for t in range(T):
        seq = torch.cat([x, canvas[t]], dim=1)
        logits = other.inner.denoise_logits(seq)[:, x.shape[1]:]
        assert torch.equal(logits.argmax(-1), comp["top1"][t])


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_teacher_against_itself(family):
    teacher = tiny_model(family, seed=0)
    rec = mechanism_records(teacher, teacher, _prompts(teacher.config.vocab_size), gen_kwargs=GEN[family])
    s = summarize_mechanism(rec)
    assert s["flips"]["rate"] == 0.0
    assert s["mismatch"]["rate"] == s["mismatch"]["teacher_rate"]
    assert s["divergence"]["kl"] == 0.0
    assert s["lag"] == s["lag_teacher"]
    assert "step_mse" not in s


def test_different_model_and_merge():
    teacher = tiny_model("llada", seed=0)
    other = tiny_model("llada", seed=3)
    x = _prompts(teacher.config.vocab_size, b=4)
    whole = mechanism_records(teacher, other, x, gen_kwargs=GEN["llada"])
    halves = merge_records([mechanism_records(teacher, other, x[:2], gen_kwargs=GEN["llada"]),
                            mechanism_records(teacher, other, x[2:], gen_kwargs=GEN["llada"])])
    s, h = summarize_mechanism(whole), summarize_mechanism(halves)
    assert s["flips"]["n_commits"] == 4 * 8
    assert s["flips"]["rate"] > 0.0  # an unrelated random model disagrees with the teacher
    assert s["divergence"]["kl"] > 0.0
    assert s["flips"]["rate"] == pytest.approx(h["flips"]["rate"])
    assert s["mismatch"]["rate"] == pytest.approx(h["mismatch"]["rate"])
    assert s["lag"]["median"] == pytest.approx(h["lag"]["median"])
    assert len(s["step_mse"]["by_step"]) == 8


def test_cfg_is_rejected():
    teacher = tiny_model("llada", seed=0)
    with pytest.raises(ValueError, match="cfg_scale"):
        mechanism_records(teacher, teacher, _prompts(96), gen_kwargs={**GEN["llada"], "cfg_scale": 1.0})
