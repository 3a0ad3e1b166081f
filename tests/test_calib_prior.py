"""Stage I prior: accumulation on a hand-made Trace equals hand-computed weights."""

from __future__ import annotations

import math

import pytest
import torch

from fair_calib_ext.calib.prior import PositionPrior, finalize_prior, lambda0
from fair_calib_ext.sampling import Trace
from prior_reference import accumulate_trace  # tests/


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _hand_trace() -> Trace:
    """B = 2 rows, G = 3 positions, T = 3 steps; one commit per row per step.

    row 0 commits positions 0, 1, 2 at steps 1, 2, 3; row 1 commits 2, 0, 1.
    """
    tr = Trace()
    order = [[0, 1, 2], [2, 0, 1]]
    probs = torch.tensor([[[0.5, 0.2, 0.3], [0.9, 0.6, 0.3]],
                          [[0.5, 0.4, 0.8], [0.9, 0.7, 0.3]],
                          [[0.5, 0.4, 0.6], [0.9, 0.7, 0.2]]])
    masked = torch.ones(2, 3, dtype=torch.bool)
    for t in range(3):
        commit = torch.zeros(2, 3, dtype=torch.bool)
        for b in range(2):
            commit[b, order[b][t]] = True
        tr.masked.append(masked.clone())
        tr.commit.append(commit)
        tr.prob.append(probs[t])
        tr.entropy.append(torch.zeros(2, 3))
        tr.margin.append(probs[t] / 2)
        tr.canvas.append(torch.zeros(2, 3, dtype=torch.long))
        tr.tokens.append(torch.zeros(2, 3, dtype=torch.long))
        tr.top1.append(torch.zeros(2, 3, dtype=torch.long))
        masked = masked & ~commit
    return tr


def _hand_weights(mode: str) -> torch.Tensor:
    # λ0 early with T = 3: step 1 -> 1, step 2 -> 2/3, step 3 -> 1/3
    f = torch.tensor([1 + 2 / 3, 2 / 3 + 1 / 3, 1 / 3 + 1], dtype=torch.float64)
    # R: c / mean(c over the row's masked positions), summed over masked positions
    # step 1: row0 c=[.5,.2,.3] mean 1/3 -> [1.5,.6,.9]; row1 c=[.9,.6,.3] mean .6 -> [1.5,1,.5]
    # step 2: row0 masked {1,2} c=[.4,.8] mean .6 -> [2/3, 4/3]; row1 masked {0,1} c=[.9,.7] mean .8 -> [1.125,.875]
    # step 3: row0 masked {2} -> [1]; row1 masked {1} -> [1]
    r = torch.tensor([1.5 + 1.5 + 1.125, 0.6 + 1.0 + 2 / 3 + 0.875 + 1.0, 0.9 + 0.5 + 4 / 3 + 1.0],
                     dtype=torch.float64)
    fn, rn = f / f.mean(), r / r.mean()
    w = {"both": fn + rn, "frontier": fn, "masked": rn}[mode]
    return (w / w.mean()).clamp(min=0.1)


@pytest.mark.parametrize("mode", ["both", "frontier", "masked"])
def test_accumulation_matches_hand_computation(mode: str) -> None:
    f = torch.zeros(3, dtype=torch.float64)
    r = torch.zeros(3, dtype=torch.float64)
    accumulate_trace(_hand_trace(), f, r, lambda0_schedule="early", reliability="prob", vocab_size=10)
    torch.testing.assert_close(f, torch.tensor([5 / 3, 1.0, 4 / 3], dtype=torch.float64))
    prior = finalize_prior(f, r, mode=mode, lambda1=1.0, floor=0.1)
    torch.testing.assert_close(prior.weights.double(), _hand_weights(mode), rtol=1e-6, atol=1e-6)


def test_margin_equals_scaled_prob_here() -> None:
    # margin = prob / 2 in the hand trace: row-mean normalisation makes c̃ identical
    f1, r1, f2, r2 = (torch.zeros(3, dtype=torch.float64) for _ in range(4))
    accumulate_trace(_hand_trace(), f1, r1, reliability="prob")
    accumulate_trace(_hand_trace(), f2, r2, reliability="margin")
    torch.testing.assert_close(r1, r2)


def test_lambda0_schedules() -> None:
    assert lambda0(1, 4, "early") == 1.0 and lambda0(4, 4, "early") == 0.25
    assert lambda0(3, 4, "flat") == 1.0
    assert lambda0(1, 4, "late") == 0.25
    assert math.isclose(lambda0(1, 4, "exp"), 1.0)
    with pytest.raises(ValueError):
        lambda0(1, 4, "sideways")


def test_positions_mapping_floor_and_roundtrip(tmp_path) -> None:
    p = PositionPrior(torch.tensor([2.0, 1.0, 0.5, 0.5]), floor=0.1, mode="both", settings={"n_probe": 3})
    pos = p.to_positions(7)
    assert pos.tolist() == pytest.approx([0.1, 0.1, 0.1, 2.0, 1.0, 0.5, 0.5])
    assert p.to_positions(2).tolist() == [0.5, 0.5]  # shorter than the window: trailing part
    assert torch.equal(PositionPrior.uniform().to_positions(5), torch.ones(5))
    p.save(tmp_path / "prior")
    q = PositionPrior.load(tmp_path / "prior.safetensors")
    assert torch.equal(q.weights, p.weights) and q.settings == {"n_probe": 3} and q.floor == 0.1
    with pytest.raises(FileNotFoundError):
        PositionPrior.load(tmp_path / "missing")
    # a separate weight before the window keeps the context in the loss; it survives save/load
    o = PositionPrior(p.weights, floor=0.1, mode="both", outside=1.0)
    assert o.to_positions(6).tolist() == pytest.approx([1.0, 1.0, 2.0, 1.0, 0.5, 0.5])
    o.save(tmp_path / "prior_o")
    assert PositionPrior.load(tmp_path / "prior_o").outside == 1.0
    with pytest.raises(ValueError, match="outside"):
        finalize_prior(torch.ones(4), torch.ones(4), outside=-1.0)


class _ConfidenceStub(torch.nn.Module):
    """A stand-in model whose logits depend only on the absolute position: token 0 has logit
    a[j] at position j, every other token 0. Whatever the canvas, the top-1 is token 0 with
    probability c_j = e^a_j / (e^a_j + V - 1) (a_j > 0), so every confidence of the trace is known."""

    def __init__(self, a: torch.Tensor, vocab: int = 8) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(vocab_size=vocab, mask_token_id=vocab - 1, family="llada",
                                      shift_logits=False, max_position_embeddings=a.numel(), eos_token_id=None)
        self.register_buffer("a", a.float())
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # generate() reads the device from it

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):  # noqa: ANN201
        from types import SimpleNamespace

        logits = torch.zeros(*x.shape, self.config.vocab_size)
        logits[..., 0] = self.a[: x.shape[1]]
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("mode", ["both", "frontier", "masked"])
def test_probe_prior_runs_the_sampler(mode: str) -> None:
    """probe_prior on a controlled trace: with one-token blocks the commit order is forced (step t
    commits position t - 1, 0-based), and the stub fixes every confidence, so F, R and the prior
    follow by hand from the reference formulas (a probe returning ones, or ignoring either term,
    fails here)."""
    from fair_calib_ext.calib.prior import probe_prior

    P, G, V, n_probe = 4, 6, 8, 5
    a = torch.tensor([0.0] * P + [3.0, 0.5, 2.0, 0.2, 1.0, 4.0])  # > 0: token 0 stays the top-1
    prompts = torch.randint(0, V - 1, (3, P), generator=torch.Generator().manual_seed(0))
    pr = probe_prior(_ConfidenceStub(a, V), prompts, n_probe=n_probe, gen_length=G, block_length=1,
                     batch_size=2, mode=mode, floor=0.1, combine="balanced", lambda1=1.0, policy="random",
                     progress=False)

    e = torch.exp(a[P:].double())
    c = e / (e + V - 1)  # top-1 probability at each generation position
    T = G
    f = torch.tensor([n_probe * (T - i) / T for i in range(G)], dtype=torch.float64)  # λ0 early at t = i + 1
    r = torch.tensor([n_probe * sum(float(c[i] / c[t:].mean()) for t in range(i + 1)) for i in range(G)],
                     dtype=torch.float64)  # position i is masked at steps 1..i+1, with positions t..G-1
    w = {"both": f / f.mean() + r / r.mean(), "frontier": f / f.mean(), "masked": r / r.mean()}[mode]
    want = (w / w.mean()).clamp(min=0.1)
    assert pr.weights.shape == (G,) and pr.settings["n_probe"] == n_probe
    assert pr.settings["policy"] == "random"
    torch.testing.assert_close(pr.weights.double(), want, rtol=1e-5, atol=1e-6)
    assert float(want.max() - want.min()) > 0.3  # the trace gives the prior a real shape


def test_lambda0_has_one_name_per_schedule() -> None:
    """The undocumented "const" alias of "flat" is gone: every schedule is one of LAMBDA0_SCHEDULES."""
    from fair_calib_ext.calib.prior import LAMBDA0_SCHEDULES

    assert [lambda0(2, 4, s) for s in ("early", "flat", "late")] == [0.75, 1.0, 0.5]
    assert "const" not in LAMBDA0_SCHEDULES
    with pytest.raises(ValueError, match="unknown lambda0 schedule 'const'"):
        lambda0(2, 4, "const")
