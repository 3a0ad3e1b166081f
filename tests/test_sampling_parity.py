"""Our samplers vs reference samplers written in this file from the official algorithms.

``ref_llada_generate`` follows ML-GSAI/LLaDA ``generate.py`` (current version: attention mask,
``logits_eos_inf`` / ``confidence_eos_eot_inf``, softmax confidence in the model dtype);
``ref_dream_sample`` follows Dream's ``generation_utils._sample``. Both draw randomness from the
global RNG exactly where the official code does, so with ``generator=None`` and the same
``torch.manual_seed`` our sampler must agree token for token even when sampling.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fair_calib_ext.models.testing import tiny_model
from fair_calib_ext.sampling import generate, left_pad


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

NEG_INF = float("-inf")


# ------------------------------------------------------------------------------ references


def _ref_transfer_counts(block_mask: torch.Tensor, steps: int) -> torch.Tensor:
    total = block_mask.sum(dim=1, keepdim=True)
    out = torch.zeros(total.size(0), steps, dtype=torch.int64) + total // steps
    for r in range(total.size(0)):
        out[r, : int(total[r] % steps)] += 1
    return out


@torch.no_grad()
def ref_llada_generate(model, prompt, attention_mask=None, steps=8, gen_length=8, block_length=8,
                       temperature=0.0, cfg_scale=0.0, remasking="low_confidence", mask_id=95,
                       logits_eos_inf=False, confidence_eos_eot_inf=False, eos_id=2, eot_id=3):
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long)
    x[:, :P] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones(B, gen_length, dtype=attention_mask.dtype)], -1)
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    n_blocks = gen_length // block_length
    assert steps % n_blocks == 0
    steps //= n_blocks
    for nb in range(n_blocks):
        lo, hi = P + nb * block_length, P + (nb + 1) * block_length
        counts = _ref_transfer_counts(x[:, lo:hi] == mask_id, steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                am = torch.cat([attention_mask, attention_mask]) if attention_mask is not None else None
                both = model(torch.cat([x, un_x]), attention_mask=am).logits
                cond, un = torch.chunk(both, 2, dim=0)
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                logits = model(x, attention_mask=attention_mask).logits
            if logits_eos_inf:
                logits[:, :, eos_id] = NEG_INF
            if temperature == 0:
                noisy = logits
            else:
                l64 = logits.to(torch.float64)
                noise = torch.rand_like(l64, dtype=torch.float64)
                noisy = l64.exp() / (-torch.log(noise)) ** temperature
            x0 = torch.argmax(noisy, dim=-1)
            if confidence_eos_eot_inf:
                noisy[:, :, eos_id] = logits[:, :, eot_id] = NEG_INF
            if remasking == "low_confidence":
                x0_p = torch.gather(F.softmax(logits, dim=-1), -1, x0[..., None]).squeeze(-1)
            elif remasking == "random":
                x0_p = torch.rand((x0.shape[0], x0.shape[1]))
            else:
                raise NotImplementedError(remasking)
            x0_p[:, hi:] = NEG_INF
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, x0_p, torch.tensor(NEG_INF))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for r in range(conf.shape[0]):
                _, sel = torch.topk(conf[r], k=int(counts[r, i]))
                transfer[r, sel] = True
            x[transfer] = x0[transfer]
    return x


def _ref_sample_tokens(logits, temperature, top_p, top_k, margin=False, neg_entropy=False):
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        srt, order = torch.sort(logits, descending=True)
        cum = torch.cumsum(F.softmax(srt, dim=-1), dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = 0
        m = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, remove)
        logits = logits.masked_fill(m, torch.finfo(logits.dtype).min)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)))[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        x0 = torch.distributions.Categorical(probs=probs).sample()
        conf = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        conf, x0 = probs.max(dim=-1)
    if margin:
        sp, _ = torch.sort(probs, dim=-1, descending=True)
        conf = sp[:, 0] - sp[:, 1]
    if neg_entropy:
        conf = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return conf, x0


# transformers 4.x ``PretrainedConfig`` carries ``top_k = 50`` (and ``top_p = 1.0``); Dream's
# ``diffusion_generate`` builds its ``DreamGenerationConfig`` from the model config, so this is the
# official default whenever neither the caller nor the checkpoint sets ``top_k``.
HF_CONFIG_TOP_K = 50


def ref_dream_top_k(caller: int | None, generation_config: dict) -> int | None:
    """The top_k the official Dream code samples with: the caller's, else the checkpoint's
    generation config (a null there disables it), else transformers' config default."""
    if caller is not None:
        return caller
    if "top_k" in generation_config:
        return generation_config["top_k"]
    return HF_CONFIG_TOP_K


@torch.no_grad()
def ref_dream_sample(model, input_ids, max_new_tokens, steps, alg="entropy", temperature=0.0, top_p=None,
                     top_k=None, alg_temp=None, eps=1e-3, mask_id=95):
    x = F.pad(input_ids, (0, max_new_tokens), value=mask_id)
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_id
        logits = model(x).logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index], dtype=torch.long) + mask_id
            move = torch.rand(*x0.shape) < p_transfer
            _, x0[move] = _ref_sample_tokens(mask_logits[move], temperature, top_p, top_k)
            x[mask_index] = x0.clone()
            continue
        conf, x0 = _ref_sample_tokens(mask_logits, temperature, top_p, top_k,
                                      margin=alg == "topk_margin", neg_entropy=alg == "entropy")
        n_mask = mask_index.sum() / mask_index.shape[0]
        k = int(n_mask * (1 - s / t)) if i < steps - 1 else int(n_mask)
        full = torch.full_like(x, NEG_INF, dtype=logits.dtype)
        full[mask_index] = conf
        if k > 0:
            if alg_temp is None or alg_temp == 0:
                _, idx = torch.topk(full, k)
            else:
                idx = torch.multinomial(F.softmax(full / alg_temp, dim=-1), num_samples=k)
            cand = torch.zeros_like(x) + mask_id
            cand[mask_index] = x0.clone()
            rows = torch.arange(x.size(0)).unsqueeze(1).expand_as(idx)
            x[rows, idx] = cand[rows, idx]
    return x


# ------------------------------------------------------------------------------ tests


def _prompts(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(4, 90, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llada():
    return tiny_model("llada", seed=11)


@pytest.fixture(scope="module")
def dream():
    return tiny_model("dream", seed=12)


LLADA_SHAPES = [  # (gen_length, steps, block_length)
    (8, 8, 8), (8, 4, 4), (12, 6, 4), (10, 10, 2), (9, 3, 9), (16, 16, 8),
]


@pytest.mark.parametrize("gen,steps,block", LLADA_SHAPES)
def test_llada_low_confidence_t0_matches_official(llada, gen, steps, block):
    prompt = _prompts(2, 5, gen)
    want = ref_llada_generate(llada, prompt, steps=steps, gen_length=gen, block_length=block)
    got = generate(llada, prompt, gen_length=gen, steps=steps, block_length=block)
    assert torch.equal(got, want)
    assert not (got == 95).any()


def test_llada_block_length_none_is_one_block(llada):
    prompt = _prompts(1, 4, 0)
    want = ref_llada_generate(llada, prompt, steps=6, gen_length=12, block_length=12)
    assert torch.equal(generate(llada, prompt, gen_length=12, steps=6), want)


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_llada_global_rng_stream_matches_official(llada, remasking, temperature):
    prompt = _prompts(2, 4, 3)
    torch.manual_seed(1234)
    want = ref_llada_generate(llada, prompt, steps=8, gen_length=8, block_length=4,
                              temperature=temperature, remasking=remasking)
    torch.manual_seed(1234)
    got = generate(llada, prompt, gen_length=8, steps=8, block_length=4, temperature=temperature, remasking=remasking)
    assert torch.equal(got, want)


def test_llada_cfg_matches_official_with_mask(llada):
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]], pad_id=2)
    want = ref_llada_generate(llada, ids, attention_mask=mask, steps=8, gen_length=8, block_length=4, cfg_scale=1.5)
    got = generate(llada, ids, attention_mask=mask, gen_length=8, steps=8, block_length=4, cfg_scale=1.5)
    assert torch.equal(got, want)


def test_llada_cfg_without_mask(llada):
    """The official generate() raises NameError here; ours runs and equals the mask-free math."""
    prompt = _prompts(1, 5, 8)
    want = ref_llada_generate(llada, prompt, steps=4, gen_length=8, block_length=8, cfg_scale=0.7)
    got = generate(llada, prompt, gen_length=8, steps=4, cfg_scale=0.7)
    assert torch.equal(got, want)
    assert not torch.equal(got, generate(llada, prompt, gen_length=8, steps=4))


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("flags", [(True, False), (False, True)])
def test_llada_eos_flags_match_official(temperature, flags):
    # a model where EOS (2) and EoT (3) are likely, so the flags matter
    model = tiny_model("llada", seed=5)
    with torch.no_grad():
        model.lm_head.weight[2] += 2.0 * model.lm_head.weight[7]
        model.lm_head.weight[3] += 2.0 * model.lm_head.weight[8]
    prompt = _prompts(2, 4, 4)
    kw = dict(logits_eos_inf=flags[0], confidence_eos_eot_inf=flags[1])
    torch.manual_seed(7)
    want = ref_llada_generate(model, prompt, steps=8, gen_length=8, block_length=8, temperature=temperature, **kw)
    torch.manual_seed(7)
    got = generate(model, prompt, gen_length=8, steps=8, temperature=temperature, eot_token_id=3, **kw)
    assert torch.equal(got, want)
    if flags[0]:
        assert not (got[:, 4:] == 2).any()


DREAM_CASES = [  # (gen, steps, alg, top_p, top_k)
    (8, 8, "entropy", None, None),
    (8, 8, "entropy", None, 50),
    (12, 5, "entropy", 0.95, None),
    (10, 10, "topk_margin", None, None),
    (10, 4, "maskgit_plus", 0.9, 20),
    (6, 6, "origin", None, None),
]


@pytest.mark.parametrize("gen,steps,alg,top_p,top_k", DREAM_CASES)
def test_dream_t0_matches_official(dream, gen, steps, alg, top_p, top_k):
    prompt = _prompts(1, 5, gen + steps)
    torch.manual_seed(0)  # origin draws its transfer coins even at T = 0
    want = ref_dream_sample(dream, prompt, gen, steps, alg=alg, top_p=top_p, top_k=ref_dream_top_k(top_k, {}))
    torch.manual_seed(0)
    got = generate(dream, prompt, gen_length=gen, steps=steps, remasking=alg, top_p=top_p, top_k=top_k)
    assert torch.equal(got, want)
    assert not (got == 95).any()


@pytest.mark.parametrize("alg,alg_temp", [("entropy", None), ("maskgit_plus", 0.5), ("origin", None)])
def test_dream_sampled_global_rng_matches_official(dream, alg, alg_temp):
    prompt = _prompts(1, 4, 21)
    torch.manual_seed(99)
    want = ref_dream_sample(dream, prompt, 8, 8, alg=alg, temperature=0.7, top_p=0.95, alg_temp=alg_temp,
                            top_k=HF_CONFIG_TOP_K)
    torch.manual_seed(99)
    got = generate(dream, prompt, gen_length=8, steps=8, remasking=alg, temperature=0.7, top_p=0.95, alg_temp=alg_temp)
    assert torch.equal(got, want)


def test_dream_equal_length_batch_matches_official(dream):
    prompt = _prompts(3, 4, 5)
    want = ref_dream_sample(dream, prompt, 8, 4, alg="entropy", top_k=HF_CONFIG_TOP_K)
    assert torch.equal(generate(dream, prompt, gen_length=8, steps=4, remasking="entropy"), want)


def test_dream_generation_config_defaults(dream):
    """top_k from generation_config.json truncates before the entropy confidence is computed."""
    prompts = [_prompts(1, 5, s) for s in range(6)]
    dream.generation_config = {"top_k": 3, "top_p": None, "alg_temp": 0.0}
    try:
        differs = 0
        for prompt in prompts:
            want = ref_dream_sample(dream, prompt, 8, 8, alg="entropy", top_k=3)
            got = generate(dream, prompt, gen_length=8, steps=8, remasking="entropy")
            assert torch.equal(got, want)
            plain = ref_dream_sample(dream, prompt, 8, 8, alg="entropy")
            differs += int(not torch.equal(plain, want))
        assert differs > 0, "top_k truncation never changed the result; the test model is too peaked"
    finally:
        dream.generation_config = {}


@pytest.mark.parametrize("caller,gen_config", [
    (None, {}),  # official default: transformers' top_k = 50 from the model config
    (None, {"top_k": 7}),  # the checkpoint's generation_config.json
    (20, {"top_k": 7}),  # the caller wins
    (None, {"top_k": None}),  # a checkpoint that disables it
])
def test_dream_default_top_k_resolution_matches_official(dream, caller, gen_config):
    """Dream's entropy confidence is computed after the top-k truncation, so the resolved top_k
    decides which positions commit; with vocab 96 > 50 the default truncation matters."""
    assert dream.config.vocab_size > HF_CONFIG_TOP_K
    dream.generation_config = gen_config
    try:
        changed = 0
        for seed in range(6):
            prompt = _prompts(1, 5, 40 + seed)
            want = ref_dream_sample(dream, prompt, 8, 8, alg="entropy", top_k=ref_dream_top_k(caller, gen_config))
            got = generate(dream, prompt, gen_length=8, steps=8, remasking="entropy", top_k=caller)
            assert torch.equal(got, want), (seed, got, want)
            full = ref_dream_sample(dream, prompt, 8, 8, alg="entropy", top_k=None)
            changed += int(not torch.equal(full, want))
        if ref_dream_top_k(caller, gen_config) is not None:
            assert changed > 0, "top-k truncation never changed a decode; the test would not see a wrong default"
    finally:
        dream.generation_config = {}


def test_dream_top_k_zero_means_full_distribution(dream):
    prompt = _prompts(1, 5, 3)
    want = ref_dream_sample(dream, prompt, 8, 8, alg="entropy", top_k=None)
    assert torch.equal(generate(dream, prompt, gen_length=8, steps=8, remasking="entropy", top_k=0), want)
    with pytest.raises(ValueError, match="top_k"):
        generate(dream, prompt, gen_length=8, steps=8, remasking="entropy", top_k=-1)
