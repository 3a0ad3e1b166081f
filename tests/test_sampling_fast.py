"""Fast decoding (``generate(cache=..., threshold=...)``) vs an independent oracle in this file.

The oracle restates NVlabs/Fast-dLLM's loops (LLaDA ``llada/generate.py``: ``generate``,
``generate_with_prefix_cache``, ``generate_with_dual_cache``, ``get_transfer_index``; Dream
``dream/model/generation_utils_block.py``: the block ``_sample``) step by step, written here from
their algorithm. It never uses the package's cache: every forward is the model's plain forward
over the whole sequence, and the approximate cache is emulated by *K/V injection* — forward
hooks on each layer's ``k_proj`` / ``v_proj`` record their outputs at a block's refresh forward
and, at later steps, overwrite the rows of every position outside the window with the recorded
ones. The window's logits then equal a cached forward's: cached positions contribute stale
keys/values, the window fresh ones (RoPE acts per position, so pre-RoPE injection is the same).

Two guards are added to the oracle where Fast-dLLM itself would not finish (documented in
``fair_calib_ext.sampling.fast``): a deterministic threshold step whose commits were all [MASK]
(tiny random models predict it) ends the block, and an exhausted LLaDA count schedule ends it.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from fair_calib_ext.models.testing import tiny_model
from fair_calib_ext.sampling import DecodeStats, Trace, generate

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MASK = 95  # tiny_config's mask_token_id
NEG_INF = float("-inf")


# ---------------------------------------------------------------------------- K/V injection


class Injector:
    """The model's plain forward with stale k/v rows injected outside a window."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.saved: dict[tuple[int, str], torch.Tensor] = {}
        self.mode: str | None = None
        self.stale: torch.Tensor | None = None

    @contextlib.contextmanager
    def hooked(self):
        handles = []
        for i, layer in enumerate(self.model.layers):
            for name in ("k_proj", "v_proj"):
                handles.append(getattr(layer.attn, name).register_forward_hook(self._hook(i, name)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, i: int, name: str):
        def hook(_mod, _inp, out):
            if self.mode == "record":
                self.saved[(i, name)] = out.detach().clone()
            elif self.mode == "inject":
                out = out.clone()
                out[:, self.stale] = self.saved[(i, name)][:, self.stale]
                return out
            return None
        return hook

    def full(self, x: torch.Tensor) -> torch.Tensor:
        self.mode = None
        return self.model(x).logits

    def refresh(self, x: torch.Tensor) -> torch.Tensor:
        self.mode = "record"
        try:
            return self.model(x).logits
        finally:
            self.mode = None

    def window(self, x: torch.Tensor, ws: int, we: int) -> torch.Tensor:
        """Raw logits of positions [ws, we) with every other position's k/v from the refresh."""
        pos = torch.arange(x.shape[1])
        self.stale = (pos < ws) | (pos >= we)
        self.mode = "inject"
        try:
            return self.model(x).logits[:, ws:we]
        finally:
            self.mode = None


# ---------------------------------------------------------------------------- LLaDA oracle


def _counts(block_mask: torch.Tensor, steps: int) -> torch.Tensor:
    total = block_mask.sum(dim=1, keepdim=True)
    out = torch.zeros(total.size(0), steps, dtype=torch.int64) + total // steps
    for r in range(total.size(0)):
        out[r, : int(total[r] % steps)] += 1
    return out


def gumbel(logits, temperature):
    """LLaDA's float64 Gumbel-max noise (global RNG); the logits themselves at temperature 0."""
    if temperature == 0:
        return logits
    l64 = logits.to(torch.float64)
    return l64.exp() / (-torch.log(torch.rand_like(l64, dtype=torch.float64))) ** temperature


def ref_transfer(logits, mask_index, x, k, threshold, temperature=0.0):
    """get_transfer_index with low_confidence."""
    x0 = torch.argmax(gumbel(logits, temperature), dim=-1)
    p = F.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
    x0 = torch.where(mask_index, x0, x)
    conf = torch.where(mask_index, x0_p, torch.tensor(NEG_INF, dtype=x0_p.dtype))
    transfer = torch.zeros_like(x0, dtype=torch.bool)
    if threshold is not None:
        k = mask_index.sum(dim=1)
    for j in range(conf.shape[0]):
        _, sel = torch.topk(conf[j], k=int(k[j]))
        transfer[j, sel] = True
        if threshold is not None:
            for r in range(1, int(k[j])):
                if conf[j, sel[r]] < threshold:
                    transfer[j, sel[r]] = False
    return x0, transfer


@torch.no_grad()
def ref_llada(model, prompt, *, steps, gen_length, block_length, cache, threshold, temperature=0.0):
    """Returns (ids, nfe)."""
    inj = Injector(model)
    p = prompt.shape[1]
    x = torch.full((1, p + gen_length), MASK, dtype=torch.long)
    x[:, :p] = prompt
    n_blocks = gen_length // block_length
    spb = steps // n_blocks
    nfe = 0
    with inj.hooked():
        for nb in range(n_blocks):
            s, e = p + nb * block_length, p + (nb + 1) * block_length
            counts = _counts(x[:, s:e] == MASK, spb)
            if cache is None:  # Fast-dLLM generate()
                i = 0
                while True:
                    nfe += 1
                    mask_index = x == MASK
                    mask_index[:, e:] = False
                    before = int(mask_index.sum())
                    logits = inj.full(x)
                    x0, tr = ref_transfer(logits, mask_index, x, counts[:, i] if threshold is None else None,
                                          threshold, temperature)
                    x[tr] = x0[tr]
                    i += 1
                    left = int((x[:, s:e] == MASK).sum())
                    if left == 0:
                        break
                    if (threshold is None and i == spb) or (threshold is not None and left == before):
                        break  # guards: Fast-dLLM would index past its schedule / loop forever
                continue
            # prefix / dual: step 0 on the whole sequence (and its k/v recorded)
            logits = inj.refresh(x)
            nfe += 1
            mask_index = x == MASK
            mask_index[:, e:] = False
            x0, tr = ref_transfer(logits, mask_index, x, counts[:, 0] if threshold is None else None, threshold,
                                  temperature)
            x[tr] = x0[tr]
            ws, we = (s, x.shape[1]) if cache == "prefix" else (s, e)
            i = 1
            while True:
                if threshold is None and i == spb:
                    break  # guard: Fast-dLLM would index past its schedule
                nfe += 1
                xw = x[:, ws:we]
                mask_index = xw == MASK
                mask_index[:, block_length:] = False
                before = int(mask_index.sum())
                logits = inj.window(x, ws, we)
                if cache == "prefix":
                    torch.argmax(gumbel(logits, temperature), dim=-1)  # their prefix loop's extra, unused draw
                x0, tr = ref_transfer(logits, mask_index, xw, counts[:, i] if threshold is None else None, threshold,
                                      temperature)
                xw[tr] = x0[tr]
                left = int((x[:, s:e] == MASK).sum())
                if left == 0 or (threshold is not None and left == before):
                    break
                i += 1
    return x, nfe


# ---------------------------------------------------------------------------- Dream oracle


def ref_sample_tokens(logits, top_k, neg_entropy=False):
    """sample_tokens at temperature 0 (top_p off)."""
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1)
    confidence, x0 = probs.max(dim=-1)
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def _shift(raw):
    return torch.cat([raw[:, :1], raw[:, :-1]], dim=1)


@torch.no_grad()
def ref_dream(model, prompt, *, steps, gen_length, block_length, cache, threshold, top_k=50, eps=1e-3):
    """Returns (ids, nfe). cache=None: the same loop with full forwards (aligned over the sequence)."""
    inj = Injector(model)
    p = prompt.shape[1]
    x = torch.full((1, p + gen_length), MASK, dtype=torch.long)
    x[:, :p] = prompt
    L = x.shape[1]
    n_blocks = gen_length // block_length
    spb = steps // n_blocks
    ts = torch.linspace(1, eps, spb + 1)
    nfe = 0
    with inj.hooked():
        for nb in range(n_blocks):
            s, e = p + nb * block_length, p + (nb + 1) * block_length
            logits = _shift(inj.refresh(x))
            nfe += 1
            _, x0 = ref_sample_tokens(logits, top_k)
            x[:, s] = x0[:, s]
            ws, we = (s, e) if cache == "dual" else (s, L)
            i = 1
            while True:
                if cache is None:
                    logits = _shift(inj.full(x))[:, ws:we]
                else:
                    logits = _shift(inj.window(x, ws, we))  # shifted within the window
                nfe += 1
                xw = x[:, ws:we]
                mask_index = xw == MASK
                if threshold is not None:
                    conf, x0 = ref_sample_tokens(logits[mask_index], top_k)
                    cand = torch.full_like(xw, MASK)
                    full = torch.full(xw.shape, NEG_INF, dtype=logits.dtype)
                    cand[mask_index] = x0
                    full[mask_index] = conf
                    full[:, block_length:] = NEG_INF
                    n = int((x[:, s:e] == MASK).sum())
                    vals, sel = torch.topk(full, n)
                    tr = torch.zeros_like(cand, dtype=torch.bool)
                    tr[0, sel[0]] = True
                    for k in range(1, n):
                        if vals[0, k] < threshold:
                            tr[0, sel[0, k]] = False
                    xw[tr] = cand[tr]
                    if n and int((x[:, s:e] == MASK).sum()) == n:
                        break  # guard: Fast-dLLM would repeat this step forever
                else:
                    if i == spb:
                        break
                    t, s_ = ts[i], ts[i + 1]
                    mask_index[:, block_length:] = False
                    conf, x0 = ref_sample_tokens(logits[mask_index], top_k, neg_entropy=True)
                    n_mask = mask_index.sum() / mask_index.shape[0]
                    k = int(n_mask * (1 - s_ / t)) if i < spb - 1 else int(n_mask)
                    full = torch.full(xw.shape, NEG_INF, dtype=logits.dtype)
                    full[mask_index] = conf
                    if k > 0:
                        _, sel = torch.topk(full, k)
                        cand = torch.full_like(xw, MASK)
                        cand[mask_index] = x0
                        xw[0, sel[0]] = cand[0, sel[0]]
                    i += 1
                if int((x[:, s:e] == MASK).sum()) == 0:
                    break
    return x, nfe


# ---------------------------------------------------------------------------- token-exact tests

SETTINGS = [  # (gen_length, steps, block_length)
    (16, 8, 8),
    (24, 12, 8),
    (16, 16, 4),
    (12, 6, 12),
]
MODES = [(None, 0.3), ("prefix", None), ("dual", None), ("prefix", 0.3), ("dual", 0.3), ("dual", 0.5)]


def _prompt(seed: int, n: int = 6) -> torch.Tensor:
    return torch.randint(3, 90, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models():
    return {"llada": tiny_model("llada", seed=11), "dream": tiny_model("dream", seed=12)}


@pytest.mark.parametrize("gen,steps,block", SETTINGS)
@pytest.mark.parametrize("cache,threshold", MODES)
def test_llada_matches_fast_dllm(models, gen, steps, block, cache, threshold):
    model = models["llada"]
    for seed in (0, 1):
        prompt = _prompt(seed)
        want, nfe = ref_llada(model, prompt, steps=steps, gen_length=gen, block_length=block, cache=cache,
                              threshold=threshold)
        st = DecodeStats()
        got = generate(model, prompt, gen_length=gen, steps=steps, block_length=block,
                       remasking="low_confidence", cache=cache, threshold=threshold, stats=st)
        assert torch.equal(got, want), (seed, got[0, 6:].tolist(), want[0, 6:].tolist())
        assert st.nfe == nfe


@pytest.mark.parametrize("cache,threshold", MODES)
def test_llada_sampling_matches_fast_dllm(models, cache, threshold):
    """Temperature > 0: Gumbel noise drawn where (and as often as) Fast-dLLM draws it, global RNG."""
    model = tiny_model("llada", seed=11, init_std=0.2)
    prompt = _prompt(5)
    torch.manual_seed(7)
    want, nfe = ref_llada(model, prompt, steps=8, gen_length=16, block_length=8, cache=cache, threshold=threshold,
                          temperature=0.7)
    torch.manual_seed(7)
    st = DecodeStats()
    got = generate(model, prompt, gen_length=16, steps=8, block_length=8, temperature=0.7, cache=cache,
                   threshold=threshold, stats=st)
    assert torch.equal(got, want) and st.nfe == nfe


@pytest.mark.parametrize("gen,steps,block", SETTINGS)
@pytest.mark.parametrize("cache,threshold", MODES)
def test_dream_matches_fast_dllm(models, gen, steps, block, cache, threshold):
    model = models["dream"]
    for seed in (0, 1):
        prompt = _prompt(seed)
        want, nfe = ref_dream(model, prompt, steps=steps, gen_length=gen, block_length=block, cache=cache,
                              threshold=threshold)
        st = DecodeStats()
        got = generate(model, prompt, gen_length=gen, steps=steps, block_length=block, remasking="entropy",
                       cache=cache, threshold=threshold, stats=st)
        assert torch.equal(got, want), (seed, got[0, 6:].tolist(), want[0, 6:].tolist())
        assert st.nfe == nfe


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_dream_full_distribution_and_one_step_blocks(models, cache):
    """top_k=0 (no truncation) changes the confidences; with one step per block Dream's entropy
    loop stops right after the refresh, leaving the rest of the block masked (its quirk)."""
    model, prompt = models["dream"], _prompt(3)
    want, _ = ref_dream(model, prompt, steps=8, gen_length=16, block_length=8, cache=cache, threshold=0.3, top_k=0)
    got = generate(model, prompt, gen_length=16, steps=8, block_length=8, remasking="entropy", cache=cache,
                   threshold=0.3, top_k=0)
    assert torch.equal(got, want)
    st = DecodeStats()
    got = generate(model, prompt, gen_length=16, steps=2, block_length=8, remasking="entropy", cache=cache,
                   stats=st)
    want, nfe = ref_dream(model, prompt, steps=2, gen_length=16, block_length=8, cache=cache, threshold=None)
    assert torch.equal(got, want) and st.nfe == nfe == 4
    assert int((got[0, 6:] == MASK).sum()) == 14  # only each block's first position was committed


def test_cache_changes_results(models):
    """The oracles are not trivially equal: the approximate cache moves tokens on these models
    (so a cache that silently recomputed everything would fail the token-exact tests)."""
    model, prompt = models["llada"], _prompt(0)
    exact, _ = ref_llada(model, prompt, steps=8, gen_length=16, block_length=8, cache=None, threshold=0.3)
    kw = {"gen_length": 16, "steps": 8, "block_length": 8, "threshold": 0.3}
    dual = generate(model, prompt, cache="dual", **kw)
    prefix = generate(model, prompt, cache="prefix", **kw)
    assert not torch.equal(dual, exact) or not torch.equal(prefix, exact)


# ---------------------------------------------------------------------------- model-level cache


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_forward_equals_injected_forward(family, dtype):
    from fair_calib_ext.models import KVCache

    model = tiny_model(family, seed=5, dtype=dtype)
    x = torch.randint(3, 90, (1, 20), generator=torch.Generator().manual_seed(2))
    inj = Injector(model)
    with torch.no_grad(), inj.hooked():
        kv = KVCache.empty(len(model.layers))
        full = model(x, kv_cache=kv).logits
        torch.testing.assert_close(full, inj.refresh(x), rtol=0, atol=0)
        x2 = x.clone()
        x2[0, 8:12] = torch.tensor([5, 6, 7, 8])  # the block changed since the refresh
        tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        dual = model(x2[:, 8:12], kv_cache=kv, start=8).logits
        torch.testing.assert_close(dual, inj.window(x2, 8, 12), **tol)
        # the dual window replaced its own entries in place: a second identical call agrees
        torch.testing.assert_close(model(x2[:, 8:12], kv_cache=kv, start=8).logits, dual, rtol=0, atol=0)
        assert kv.length == 20
        pre = model(x2[:, 8:], kv_cache=_prefix(model, x, 8), start=8).logits
        torch.testing.assert_close(pre, inj.window(x2, 8, 20), **tol)


def _prefix(model, x, n):
    from fair_calib_ext.models import KVCache

    kv = KVCache.empty(len(model.layers))
    model(x, kv_cache=kv)
    return kv.prefix(n)


def test_cache_refuses_bad_windows():
    from fair_calib_ext.models import KVCache

    model = tiny_model("llada", seed=0)
    x = torch.randint(3, 90, (1, 12))
    with torch.no_grad():
        kv = KVCache.empty(len(model.layers))
        with pytest.raises(ValueError, match="from position 0"):
            model(x[:, 4:], kv_cache=kv, start=4)
        model(x, kv_cache=kv)
        pre = kv.prefix(4)
        with pytest.raises(ValueError, match="fits neither"):
            model(x[:, 6:], kv_cache=pre, start=6)
        with pytest.raises(ValueError, match="padding"):
            model(x, attention_mask=torch.tensor([[0] + [1] * 11]), kv_cache=KVCache.empty(2))


# ---------------------------------------------------------------------------- quantized, bf16


@pytest.fixture(scope="module")
def quantized():
    calib = pytest.importorskip("fair_calib_ext.calib")
    if getattr(__import__("fair_calib_ext"), "_C", None) is None:
        pytest.skip("W4A4 kernels not built")
    out = {}
    for fam, seed in (("llada", 11), ("dream", 12)):
        out[fam] = calib.calibrate(tiny_model(fam, seed=seed), "rtn", torch.randint(4, 90, (2, 16)), progress=False)
    return out


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_quantized_w4a4_matches_oracle(quantized, family, cache):
    """W4A4 linears see only the window's tokens; per-token activation quantization keeps the
    window's rows what the full forward computes, so the oracle still applies token for token."""
    model = quantized[family]
    assert not isinstance(model.layers[0].attn.k_proj, torch.nn.Linear)  # a quantized module
    prompt = _prompt(4)
    ref = ref_llada if family == "llada" else ref_dream
    rm = "low_confidence" if family == "llada" else "entropy"
    for thr in (None, 0.3):
        want, nfe = ref(model, prompt, steps=8, gen_length=16, block_length=8, cache=cache, threshold=thr)
        st = DecodeStats()
        got = generate(model, prompt, gen_length=16, steps=8, block_length=8, remasking=rm, cache=cache,
                       threshold=thr, stats=st)
        assert torch.equal(got, want) and st.nfe == nfe


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_bf16_runs_with_both_caches(family):
    model = tiny_model(family, seed=3, dtype=torch.bfloat16)
    rm = "low_confidence" if family == "llada" else "entropy"
    for cache in ("prefix", "dual"):
        out = generate(model, _prompt(0), gen_length=16, steps=8, block_length=8, remasking=rm, cache=cache,
                       threshold=0.5)
        assert out.shape == (1, 22) and torch.equal(out[:, :6], _prompt(0))


# ---------------------------------------------------------------------------- defaults, NFE, trace


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_defaults_unchanged_and_nfe_equals_steps(models, family):
    model = models[family]
    rm = "low_confidence" if family == "llada" else "entropy"
    kw = {"gen_length": 16, "steps": 8, "block_length": 8, "remasking": rm}
    st, tr = DecodeStats(), Trace()
    plain = generate(model, _prompt(0), **kw)
    explicit = generate(model, _prompt(0), cache=None, threshold=None, stats=st, trace=tr, **kw)
    assert torch.equal(plain, explicit)
    assert st.nfe == st.steps == 8 and tr.nfe == 8 and tr.cache is None and tr.threshold is None


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_threshold_saves_forward_passes(models, family):
    model = models[family]
    rm = "low_confidence" if family == "llada" else "entropy"
    kw = {"gen_length": 16, "steps": 16, "block_length": 8, "remasking": rm, "cache": "dual"}
    nfe = {}
    for thr in (None, 1.0, 0.5, 0.05):
        st = DecodeStats()
        generate(model, _prompt(2), threshold=thr, stats=st, **kw)
        nfe[thr] = st.nfe
    assert nfe[None] == 16 and nfe[1.0] == 16  # one commit per step (LLaDA: 8 per block; Dream: refresh + 7)
    assert nfe[0.05] <= nfe[0.5] < nfe[1.0]
    assert nfe[0.05] == 4  # everything committed at the first window step: refresh + 1 per block


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_trace_records_every_forward(models, family):
    model = models[family]
    rm = "low_confidence" if family == "llada" else "entropy"
    tr, st = Trace(), DecodeStats()
    out = generate(model, _prompt(1), gen_length=16, steps=8, block_length=8, remasking=rm, cache="dual",
                   threshold=0.3, trace=tr, stats=st)
    assert len(tr) == tr.steps == tr.nfe == st.nfe
    assert tr.cache == "dual" and tr.threshold == 0.3
    commits = tr.stacked("commit")
    assert torch.equal(commits.any(0)[0], out[0, 6:] != MASK)
    assert int(commits.sum(dim=(1, 2)).max()) >= 2  # some step committed in parallel
    # a dual step's forward covers its block only: statistics elsewhere are NaN, top1 -1
    assert torch.isnan(tr.stacked("prob")[1][0, 8:]).all() and (tr.stacked("top1")[1][0, 8:] == -1).all()
    assert not torch.isnan(tr.stacked("prob")[0]).any()  # the refresh covers everything


def test_batch_is_decoded_row_by_row(models):
    from fair_calib_ext.sampling import left_pad

    model = models["llada"]
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    ids, mask = left_pad(rows, 2)
    st = DecodeStats()
    out = generate(model, ids, attention_mask=mask, gen_length=16, steps=8, block_length=8, cache="prefix",
                   threshold=0.3, stats=st)
    nfe = 0
    for r, row in enumerate(rows):
        want, n = ref_llada(model, torch.tensor([row]), steps=8, gen_length=16, block_length=8, cache="prefix",
                            threshold=0.3)
        assert torch.equal(out[r, 6:], want[0, len(row):]) and torch.equal(out[r, :6], ids[r])
        nfe += n
    assert st.nfe == nfe


def test_callback_sees_the_row_in_the_callers_layout(models):
    from fair_calib_ext.sampling import left_pad

    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]], 2)
    seen = []
    out = generate(models["llada"], ids, attention_mask=mask, gen_length=8, steps=8, block_length=4, cache="dual",
                   callback=lambda t, x: seen.append(x.clone()))
    assert len(seen) == 16 and all(x.shape == (1, 12) for x in seen)
    assert torch.equal(seen[7][0], out[0]) and torch.equal(seen[-1][0], out[1])  # each row's last step
    assert torch.equal(seen[8][0, :4], ids[1])  # the second row keeps its left padding


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_stop_at_eos_after_a_block(models, family):
    """stop_at_eos: once a completed block holds a stop token with no mask before it, the rest is
    filled with it and no more forwards run."""
    model = models[family]
    rm = "low_confidence" if family == "llada" else "entropy"
    kw = {"gen_length": 16, "steps": 8, "block_length": 8, "remasking": rm, "cache": "prefix", "threshold": 0.3}
    free = generate(model, _prompt(0), **kw)
    stop = int(free[0, 6])  # the first generated token
    st = DecodeStats()
    out = generate(model, _prompt(0), stop_at_eos=True, stop_token_ids=[stop], stats=st, **kw)
    assert torch.equal(out[0, :14], free[0, :14]) and (out[0, 14:] == stop).all()
    full = DecodeStats()
    generate(model, _prompt(0), stats=full, **kw)
    assert st.nfe < full.nfe


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize("family,kw,match", [
    ("llada", {"cache": "full"}, "cache must be None, 'prefix' or 'dual'"),
    ("llada", {"threshold": 0.0}, r"threshold must be in \(0, 1\]"),
    ("llada", {"threshold": 1.5}, r"threshold must be in \(0, 1\]"),
    ("llada", {"threshold": float("nan")}, r"threshold must be in \(0, 1\]"),
    ("llada", {"threshold": "0.9"}, "threshold must be a number"),
    ("llada", {"threshold": True}, "threshold must be a number"),
    ("llada", {"cache": "dual", "cfg_scale": 1.0}, "cfg_scale"),
    ("llada", {"cache": "dual", "schedule": "llada"}, "schedule does not apply"),
    ("llada", {"cache": "dual", "remasking": "entropy"}, "remasking must be 'low_confidence' or 'random'"),
    ("llada", {"cache": "dual", "top_k": 5}, "dream schedule only"),
    ("llada", {"cache": "dual", "logits_eos_inf": True}, "logits_eos_inf"),
    ("llada", {"cache": "dual", "block_length": 5}, "divisible by block_length"),
    ("dream", {"cache": "dual", "block_length": None, "remasking": "entropy"}, "needs block_length"),
    ("dream", {"threshold": 0.9, "block_length": None, "remasking": "entropy"}, "needs block_length"),
    ("dream", {"cache": "prefix", "remasking": "low_confidence"}, "remasking must be 'entropy'"),
])
def test_bad_fast_arguments(models, family, kw, match):
    args = {"gen_length": 16, "steps": 8, "block_length": 8}
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        generate(models[family], _prompt(0), **args)


def test_trace_needs_one_row(models):
    with pytest.raises(ValueError, match="trace needs a batch of one"):
        generate(models["llada"], torch.randint(3, 90, (2, 4)), gen_length=8, steps=8, cache="dual",
                 trace=Trace())


def test_settings_resolve_fast_flags():
    from fair_calib_ext.errors import UsageError
    from fair_calib_ext.sampling.settings import (
        check_fast_for_family,
        resolve_sampler_settings,
    )

    st = resolve_sampler_settings(gen_length=16, steps=16, block_length=8, cache="none", threshold="0.9")
    assert st.cache is None and st.threshold == 0.9 and st.fast
    assert not resolve_sampler_settings(gen_length=16, steps=16, block_length=None).fast
    assert resolve_sampler_settings(gen_length=16, steps=16, block_length=None, cache="prefix").cache == "prefix"
    for kw, match in [({"cache": "full"}, "--cache must be one of"), ({"threshold": 0}, "--threshold must be in"),
                      ({"threshold": "x"}, "--threshold must be a number"), ({"threshold": float("inf")}, "in")]:
        with pytest.raises(UsageError, match=match):
            resolve_sampler_settings(gen_length=16, steps=16, block_length=8, **kw)
    st = resolve_sampler_settings(gen_length=16, steps=16, block_length=None, cache="dual")
    with pytest.raises(UsageError, match="need --block-length"):
        check_fast_for_family(st, "dream")
    check_fast_for_family(st, "llada", "low_confidence")
    with pytest.raises(UsageError, match="--remasking must be entropy"):
        resolve_sampler_settings(gen_length=16, steps=16, block_length=8, cache="dual", remasking="margin",
                                 family="dream")
