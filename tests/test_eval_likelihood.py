"""MC-ELBO likelihood: mask statistics, exact values on fake models, common random numbers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fair_calib_ext.eval.likelihood import (
    elbo_masks,
    example_generator,
    mc_elbo_nll,
    perplexity,
    score_continuations,
)
from fair_calib_ext.models import ModelConfig, build_model


@pytest.fixture(scope="module")
def tiny_random_llada():
    cfg = ModelConfig(
        family="llada", vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
        rms_norm_eps=1e-5, max_position_embeddings=64, attention_bias=False,
        tie_word_embeddings=False, mask_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    return build_model(cfg, seed=0)


class PositionLogProbModel(torch.nn.Module):
    """Fake denoiser: at every position the same fixed log-probabilities, whatever the input."""

    def __init__(self, logp: torch.Tensor, shift: bool = False, mask_id: int = 0):
        super().__init__()
        self.logp = logp  # [V]
        self.config = SimpleNamespace(mask_token_id=mask_id, shift_logits=shift)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def denoise_logits(self, input_ids):
        b, s = input_ids.shape
        return self.logp.view(1, 1, -1).expand(b, s, -1).clone()


def test_masks_have_exactly_l_tokens_and_stratify():
    l, mask = elbo_masks(8, 8, example_generator(0, 0))
    assert sorted(l.tolist()) == list(range(1, 9))  # mc_num == L: every count once
    assert mask.sum(1).tolist() == l.tolist()
    l, mask = elbo_masks(5, 64, example_generator(1, 3))
    assert int(l.min()) >= 1 and int(l.max()) <= 5
    assert mask.sum(1).tolist() == l.tolist()


def test_masks_depend_only_on_seed_and_index():
    a = elbo_masks(6, 16, example_generator(3, 7))[1]
    b = elbo_masks(6, 16, example_generator(3, 7))[1]
    c = elbo_masks(6, 16, example_generator(3, 8))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_uniform_model_gives_exact_L_log_V():
    V, L = 11, 6
    model = PositionLogProbModel(torch.zeros(V))
    nll = mc_elbo_nll(model, [1, 2], [3] * L, mc_num=32, batch_size=5)
    # every masked token costs log V and the weight L/l cancels the count l exactly
    assert nll == pytest.approx(L * math.log(V), rel=1e-6)


def test_estimator_is_unbiased_for_token_dependent_costs():
    logp = torch.log_softmax(torch.tensor([0.0, 1.0, 2.0, 3.0]), 0)
    model = PositionLogProbModel(logp)
    target = [0, 3, 1, 2, 0]
    exact = -float(logp[target].sum())  # the model ignores context, so the ELBO equals the NLL
    est = mc_elbo_nll(model, [1], target, mc_num=4096, batch_size=1024)
    assert est == pytest.approx(exact, rel=0.03)


def test_dream_needs_a_prefix():
    model = PositionLogProbModel(torch.zeros(5), shift=True)
    with pytest.raises(ValueError, match="prefix"):
        mc_elbo_nll(model, [], [1, 2], mc_num=4)


def test_common_random_numbers_across_batch_sizes_and_indices(tiny_random_llada):
    model = tiny_random_llada
    pairs = [([5, 6], [7, 8, 9, 10]), ([11], [12, 13, 14])]
    a = score_continuations(model, pairs, mc_num=16, batch_size=16, seed=1)
    b = score_continuations(model, pairs, mc_num=16, batch_size=3, seed=1)
    assert a.nll == pytest.approx(b.nll, rel=1e-5)
    # sharded: the second example scored alone with its global index gives the same value
    c = score_continuations(model, pairs[1:], mc_num=16, batch_size=4, seed=1, indices=[1])
    assert c.nll[0] == pytest.approx(a.nll[1], rel=1e-5)
    d = score_continuations(model, pairs, mc_num=16, batch_size=16, seed=2)
    assert d.nll != a.nll
    ppl = perplexity(a)
    assert ppl["n_tokens"] == 7 and math.isfinite(ppl["ppl"]) and ppl["ppl"] > 1.0
