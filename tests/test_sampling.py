"""Sampler behaviour: schedules, Trace, batching, seeding, CFG, Dream shift, EOS stop, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fair_calib_ext.models.testing import tiny_config, tiny_model
from fair_calib_ext.sampling import Trace, generate, left_pad, num_transfer_tokens


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MASK, EOS = 95, 2


class TableModel(nn.Module):
    """Rigged model: raw logits come from ``fn(input_ids) -> [B, S, V]``; records batch sizes."""

    def __init__(self, family: str, fn):
        super().__init__()
        self.config = tiny_config(family)
        self.fn = fn
        self.anchor = nn.Parameter(torch.zeros(1))
        self.calls: list[int] = []

    def forward(self, input_ids, attention_mask=None):
        self.calls.append(input_ids.shape[0])
        return type("Out", (), {"logits": self.fn(input_ids)})()


def _table(seed: int, length: int = 64, vocab: int = 96) -> torch.Tensor:
    t = torch.randn(length, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    t[:, MASK] = -1e4  # never predict the mask token, so every commit unmasks
    return t


def static_model(family: str, seed: int = 0) -> TableModel:
    table = _table(seed)
    return TableModel(family, lambda ids: table[: ids.shape[1]].expand(ids.shape[0], -1, -1).clone())


# ------------------------------------------------------------------------------ schedules


def test_num_transfer_tokens():
    got = num_transfer_tokens(torch.tensor([10, 4, 0]), 4)
    assert got.tolist() == [[3, 3, 2, 2], [1, 1, 1, 1], [0, 0, 0, 0]]


@pytest.mark.parametrize("gen,steps,block", [(12, 6, 4), (15, 9, 5), (8, 8, 8)])
def test_llada_commits_follow_schedule_and_blocks(gen, steps, block):
    model = static_model("llada")
    trace = Trace()
    out = generate(model, torch.tensor([[5, 6, 7]]), gen_length=gen, steps=steps, block_length=block, trace=trace)
    commit = trace.stacked("commit")[:, 0]  # [T, G]
    per_block = steps // (gen // block)
    expect = num_transfer_tokens(torch.tensor([block]), per_block)[0].tolist() * (gen // block)
    assert commit.sum(1).tolist() == expect
    for t in range(steps):
        b = t // per_block
        pos = commit[t].nonzero().flatten()
        assert ((pos >= b * block) & (pos < (b + 1) * block)).all(), "commit outside the current block"
    assert trace.steps == steps and trace.prompt_len == 3 and trace.gen_length == gen
    assert trace.block_length == block and trace.schedule == "llada"
    assert (trace.commit_step() >= 0).all()
    assert not (out == MASK).any()


def test_dream_schedule_integer_quirk():
    """steps == new tokens: step 0 commits 0 tokens and the last step 2 (float32 linspace, int())."""
    model = static_model("dream")
    trace = Trace()
    generate(model, torch.tensor([[5, 6, 7]]), gen_length=32, steps=32, remasking="entropy", trace=trace)
    per_step = trace.stacked("commit").sum((1, 2)).tolist()
    ts = torch.linspace(1, 1e-3, 33)
    left, expect = 32, []
    for i in range(32):
        k = int(torch.tensor(float(left)) * (1 - ts[i + 1] / ts[i])) if i < 31 else left
        expect.append(k)
        left -= k
    assert per_step == expect
    assert per_step[0] == 0 and per_step[-1] == 2 and 0 in per_step[:1]


def test_dream_shift_planted_logit():
    """A logit planted at raw position j - 1 decodes position j (Dream's right shift)."""
    def fn(ids):
        b, s = ids.shape
        logits = torch.zeros(b, s, 96)
        for j in range(s):
            logits[:, j, (j + 1 + 10) % 90] = 10.0  # raw j predicts token j + 1
        return logits

    out = generate(TableModel("dream", fn), torch.tensor([[5, 6, 7]]), gen_length=6, steps=3)
    assert out[0, 3:].tolist() == [(j + 10) % 90 for j in range(3, 9)]
    # the same rigged logits without the shift (LLaDA alignment) decode one position earlier
    out_l = generate(TableModel("llada", fn), torch.tensor([[5, 6, 7]]), gen_length=6, steps=3)
    assert out_l[0, 3:].tolist() == [(j + 11) % 90 for j in range(3, 9)]


def test_cfg_mixing_and_single_batch():
    """un + (w + 1)(cond - un): cond prefers A, un prefers A more strongly than B; the mix picks B."""
    A, B = 10, 11

    def fn(ids):
        logits = torch.zeros(ids.shape[0], ids.shape[1], 96)
        cond = ids[:, 0] != MASK  # the unconditional copy has its prompt masked
        logits[cond, :, A], logits[cond, :, B] = 2.0, 1.5
        logits[~cond, :, A], logits[~cond, :, B] = 2.0, 0.0
        logits[..., MASK] = -1e4
        return logits

    model = TableModel("llada", fn)
    prompt = torch.tensor([[5, 6], [7, 8]])
    assert (generate(model, prompt, gen_length=4, steps=2)[:, 2:] == A).all()
    model.calls.clear()
    assert (generate(model, prompt, gen_length=4, steps=2, cfg_scale=1.0)[:, 2:] == B).all()
    assert model.calls == [4, 4]  # cond and uncond copies of both rows in one forward
    assert (generate(model, prompt, gen_length=4, steps=2, cfg_scale=0.2)[:, 2:] == A).all()  # 2 vs 1.8


# ------------------------------------------------------------------------------ trace


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_trace_contents(family):
    model = tiny_model(family, seed=4)
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]], pad_id=EOS)
    trace = Trace()
    out = generate(model, ids, attention_mask=mask, gen_length=8, steps=4,
                   block_length=4 if family == "llada" else None, trace=trace)
    T, B, G = 4, 2, 8
    for name in ("canvas", "masked", "commit", "tokens", "top1", "prob", "entropy", "margin"):
        assert trace.stacked(name).shape == (T, B, G), name
    canvas, masked, commit = trace.stacked("canvas"), trace.stacked("masked"), trace.stacked("commit")
    assert (canvas[0] == MASK).all() and torch.equal(masked, canvas == MASK)
    assert not (commit & ~masked).any()
    for t in range(T - 1):  # committed tokens never change
        keep = ~masked[t]
        assert torch.equal(canvas[t + 1][keep], canvas[t][keep])
        assert torch.equal(masked[t + 1], masked[t] & ~commit[t])
    final = out[:, 4:]
    tokens = trace.stacked("tokens")
    for t in range(T):
        assert torch.equal(tokens[t][commit[t]], final[commit[t]])
    # step-0 statistics equal the model's own distribution over the generation region
    x0 = torch.cat([ids, torch.full((B, G), MASK)], 1)
    attn = torch.cat([mask, torch.ones(B, G, dtype=torch.long)], 1)
    with torch.no_grad():
        probs = torch.softmax(model.denoise_logits(x0, attn)[:, 4:].float(), -1)
    torch.testing.assert_close(trace.prob[0], probs.max(-1).values)
    assert torch.equal(trace.top1[0], probs.argmax(-1))
    ent = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(trace.entropy[0], ent, atol=1e-5, rtol=1e-5)
    top2 = probs.topk(2, -1).values
    torch.testing.assert_close(trace.margin[0], top2[..., 0] - top2[..., 1])
    assert (trace.stacked("entropy") >= 0).all() and trace.stacked("margin").le(1).all()


def test_trace_without_stats_and_reuse():
    model = static_model("llada")
    trace = Trace(record_stats=False)
    generate(model, torch.tensor([[5]]), gen_length=4, steps=4, trace=trace)
    generate(model, torch.tensor([[5]]), gen_length=4, steps=2, trace=trace)
    assert len(trace) == 2 and trace.steps == 2  # reset by the second call
    with pytest.raises(ValueError, match="record_stats"):
        trace.stacked("prob")
    with pytest.raises(KeyError):
        trace.stacked("logits")


# ------------------------------------------------------------------------------ batching, seeding


@pytest.mark.parametrize("family,kw", [
    ("llada", dict(block_length=4)),
    ("llada", dict(cfg_scale=0.5)),
    ("dream", dict(remasking="entropy")),
    ("dream", dict(remasking="margin", top_p=0.9)),
    ("dream", dict(block_length=4)),
])
def test_batched_prompts_equal_one_by_one(family, kw):
    model = tiny_model(family, seed=8)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    ids, mask = left_pad(prompts, pad_id=EOS)
    batch = generate(model, ids, attention_mask=mask, gen_length=8, steps=8, **kw)
    for row, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), gen_length=8, steps=8, **kw)
        assert torch.equal(batch[row, -8:], alone[0, -8:]), f"row {row}"


@pytest.mark.parametrize("family,remasking", [("llada", "random"), ("llada", "low_confidence"),
                                              ("dream", "entropy"), ("dream", "origin")])
def test_seeded_sampling_is_reproducible(family, remasking):
    model = tiny_model(family, seed=1, init_std=0.2)
    prompt = torch.tensor([[5, 6, 7]])

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompt, gen_length=12, steps=6, temperature=1.0, remasking=remasking, generator=g)

    a, b = run(0), run(0)
    assert torch.equal(a, b)
    assert any(not torch.equal(a, run(s)) for s in (1, 2, 3))


def test_random_remasking_probe_policy_commit_order_varies():
    """Stage I's policy: random commit order, same schedule, traced through the same code path."""
    model = static_model("llada")
    orders = set()
    for seed in range(4):
        trace = Trace()
        generate(model, torch.tensor([[5, 6]]), gen_length=8, steps=8, remasking="random", trace=trace,
                 generator=torch.Generator().manual_seed(seed))
        assert trace.stacked("commit").sum((1, 2)).tolist() == [1] * 8
        orders.add(tuple(trace.commit_step()[0].tolist()))
    assert len(orders) > 1


# ------------------------------------------------------------------------------ EOS stop


@pytest.mark.parametrize("family,block", [("llada", 4), ("dream", None)])
def test_stop_at_eos(family, block):
    table = _table(3)
    table[:, EOS] = 20.0 + 0.1 * torch.arange(64, 0, -1)  # EOS everywhere, most confident on the left

    model = TableModel(family, lambda ids: table[: ids.shape[1]].expand(ids.shape[0], -1, -1).clone())
    trace = Trace()
    out = generate(model, torch.tensor([[5, 6]]), gen_length=12, steps=12, block_length=block,
                   stop_at_eos=True, trace=trace)
    assert (out[0, 2:] == EOS).all()
    assert trace.steps < 12
    full = Trace()
    generate(model, torch.tensor([[5, 6]]), gen_length=12, steps=12, block_length=block, trace=full)
    assert full.steps == 12


def test_no_stop_while_masks_precede_eos():
    table = _table(4)
    table[:, EOS] = -5.0
    table[6, EOS] = 30.0  # only gen position 4 (prompt of 2) prefers EOS, and most confidently

    model = TableModel("llada", lambda ids: table[: ids.shape[1]].expand(ids.shape[0], -1, -1).clone())
    trace = Trace()
    out = generate(model, torch.tensor([[5, 6]]), gen_length=8, steps=8, block_length=8, stop_at_eos=True,
                   trace=trace)
    assert trace.steps == 8 and out[0, 6] == EOS  # one block: stop is checked only when it completes
    trace2 = Trace()
    generate(model, torch.tensor([[5, 6]]), gen_length=8, steps=8, block_length=4, stop_at_eos=True, trace=trace2)
    assert trace2.steps == 8  # EOS sits in block 2, so block 1 finishing does not stop


# ------------------------------------------------------------------------------ errors, misc


@pytest.mark.parametrize("kw,match", [
    (dict(gen_length=10, steps=4, block_length=4), "divisible by block_length"),
    (dict(gen_length=8, steps=3, block_length=4), "divisible by the number of blocks"),
    (dict(gen_length=300, steps=3), "exceeds the model's context"),
    (dict(gen_length=8, steps=4, remasking="nope"), "remasking must be one of"),
    (dict(gen_length=8, steps=4, remasking="origin", block_length=4), "dream schedule"),
    (dict(gen_length=8, steps=4, top_k=5), "dream schedule only"),
    (dict(gen_length=8, steps=0), r"steps must be an integer in \[1, 8\], got 0"),
    (dict(gen_length=8, steps=4, temperature=-1.0), "temperature"),
    # issue 20: values that used to decode garbage or never return
    (dict(gen_length=8, steps=9), r"steps must be an integer in \[1, 8\], got 9"),
    (dict(gen_length=8, steps=10**9), r"steps must be an integer in \[1, 8\]"),
    (dict(gen_length=8.0, steps=8), "gen_length must be an integer"),
    (dict(gen_length=8, steps=4, temperature=float("nan")), "temperature must be a finite number >= 0.0, got nan"),
    (dict(gen_length=8, steps=4, temperature=float("inf")), "temperature must be a finite number"),
    (dict(gen_length=8, steps=4, cfg_scale=float("nan")), "cfg_scale must be a finite number"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        generate(static_model("llada"), torch.tensor([[5, 6]]), **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(steps=9), r"steps must be an integer in \[1, 8\], got 9"),
    (dict(steps=8, top_p=0.0), r"top_p must be a finite number in \(0.0, 1.0\]"),
    (dict(steps=8, top_p=1.5), "top_p"),
    (dict(steps=8, alg_temp=float("nan")), "alg_temp must be a finite number >= 0.0"),
    (dict(steps=8, eps=0.0), "eps must be a finite number"),
])
def test_bad_arguments_dream_schedule(kw, match):
    with pytest.raises(ValueError, match=match):
        generate(static_model("dream"), torch.tensor([[5, 6]]), gen_length=8, **kw)


@pytest.mark.parametrize("ids", [[[5, 6.0]], [[5, -1]], [[5, 10**6]], [[True, False]]])
def test_prompt_ids_must_be_token_ids(ids):
    t = torch.tensor(ids)
    with pytest.raises(ValueError, match="prompt_ids must be integer token ids in"):
        generate(static_model("llada"), t, gen_length=4, steps=4)


def test_limits_accept_their_edges():
    """Both sides of each limit: steps == gen_length, temperature 0, top_p 1 and alg_temp 0 run."""
    generate(static_model("llada"), torch.tensor([[5, 6]]), gen_length=8, steps=8, temperature=0.0)
    generate(static_model("dream"), torch.tensor([[5, 6]]), gen_length=8, steps=8, top_p=1.0, alg_temp=0.0)


def test_callback_and_left_pad():
    seen = []
    generate(static_model("dream"), torch.tensor([5, 6]), gen_length=4, steps=4,
             callback=lambda t, x: seen.append((t, int((x == MASK).sum()))))
    assert [t for t, _ in seen] == [0, 1, 2, 3] and seen[-1][1] == 0
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError):
        left_pad([[1], []], pad_id=0)
