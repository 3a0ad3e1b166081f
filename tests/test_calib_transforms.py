"""Every transform is exactly invertible before quantization: FP outputs unchanged (to 1e-4)."""

from __future__ import annotations

import copy

import pytest
import torch

import fair_calib_ext
from fair_calib_ext.calib.layerwise import _make_runner, _quantize_weights, weighted_loss
from fair_calib_ext.calib.methods import BlockContext, MethodConfig, get_transform
from fair_calib_ext.models import ModelConfig, build_model
from fair_calib_ext.quant.flatquant import FlatBlock, kron_split
from fair_calib_ext.quant.modules import PendingLinear, QuantLinear
from fair_calib_ext.quant.quantizer import QuantConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_config(family: str, layers: int = 2) -> ModelConfig:
    gqa = family == "dream"
    return ModelConfig(family=family, vocab_size=80, hidden_size=48, intermediate_size=96,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2 if gqa else 4,
                       head_dim=12, rope_theta=1e4, rms_norm_eps=1e-5, max_position_embeddings=64,
                       attention_bias=gqa, tie_word_embeddings=False, mask_token_id=79,
                       shift_logits=gqa, rope_full_precision=not gqa)


def _model(family: str):
    torch.manual_seed(0)
    m = build_model(tiny_config(family), seed=0, init_std=0.1)
    with torch.no_grad():  # non-trivial norm weights so that norm folding is exercised
        for layer in m.layers:
            layer.attn_norm.weight.uniform_(0.5, 1.5)
            layer.mlp_norm.weight.uniform_(0.5, 1.5)
        m.norm.weight.uniform_(0.5, 1.5)
    return m


def _ctx(model, layer, x, index: int = 0) -> BlockContext:
    _, kw = model.prepare_inputs(torch.zeros(1, x.shape[1], dtype=torch.long))
    run = _make_runner(kw, torch.device("cpu"), 4, torch.float32)
    y = run(layer, x, keep=True)
    return BlockContext(index=index, x_student=x, y_target=y, pos_weights=torch.ones(x.shape[1]),
                        layer_kwargs=kw, device=torch.device("cpu"), model_config=model.config,
                        layer_map=model.layer_map(), run_batches=run, loss_fn=weighted_loss,
                        log=lambda r: None, progress=False)


FP = QuantConfig(w_bits=16, a_bits=16)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_quarot_model_rotation_is_exact(family: str) -> None:
    m = _model(family)
    ids = torch.randint(0, 79, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = m(ids).logits
    tr = get_transform(MethodConfig(method="quarot", quant=FP))
    tr.prepare_model(m)  # embeddings and head: the model is not exact until every block follows
    assert (m(ids).logits - ref).abs().max() > 1e-2
    for layer in m.layers:
        tr.prepare_block(layer, m)
    torch.testing.assert_close(m(ids).logits, ref, rtol=0, atol=1e-4)
    assert bool((m.layers[0].attn_norm.weight == 1).all())  # norms fused into the linears


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("method", ["rtn", "smoothquant", "quarot", "flatquant"])
def test_block_transform_is_exact_before_quantization(family: str, method: str) -> None:
    m = _model(family)
    cfg = MethodConfig(method=method, quant=FP, epochs=1)
    tr = get_transform(cfg)
    tr.prepare_model(m)
    ids = torch.randint(0, 79, (4, 16), generator=torch.Generator().manual_seed(2))
    x, _ = m.prepare_inputs(ids)
    layer = m.layers[0]
    tr.prepare_block(layer, m)
    ctx = _ctx(m, layer, x.detach())
    tr.transform_block(layer, ctx)
    pend = [mod for mod in layer.modules() if isinstance(mod, PendingLinear)]
    assert len(pend) == 7
    out = ctx.run_batches(layer, x.detach(), keep=True)
    torch.testing.assert_close(out, ctx.y_target, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_flatquant_train_form_and_fold_are_exact(family: str) -> None:
    """With random (trained-looking) transforms, diag scales and 16 bits, the training-time
    forward and the folded deployment form both reproduce the FP block."""
    m = _model(family)
    ids = torch.randint(0, 79, (2, 16), generator=torch.Generator().manual_seed(3))
    x, kw = m.prepare_inputs(ids)
    x = x.detach()
    layer = m.layers[1]
    with torch.no_grad():
        ref = layer(x, **kw)
    mc = m.config
    stats = {r: torch.rand(n) + 0.5 for r, n in (("qkv", 48), ("up_gate", 48), ("down", 96))}
    blk = FlatBlock(layer, m.layer_map(), num_heads=mc.num_attention_heads, num_kv_heads=mc.num_key_value_heads,
                    head_dim=mc.head_dim, w_bits=16, a_bits=16, act_stats=stats, seed=5)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    blk.install(layer)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, **kw), ref, rtol=0, atol=1e-4)
        blk.fold(layer)
        torch.testing.assert_close(layer(x, **kw), ref, rtol=0, atol=1e-4)


@pytest.mark.skipif(fair_calib_ext._C is None, reason="fair_calib_ext._C not built: no int4 kernels")
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_flatquant_train_form_equals_folded_w4a4_kernels_per_linear(family: str) -> None:
    """At W4A4, with non-trivial transforms, diag scales and learned clips (weights per row,
    activations per quantizer, all != 1), each linear's training forward (fake-quant, fp32)
    equals its deployed QuantLinear on the int4 kernels (online transform + packed RTN weights
    from the engine's own quantization step), on the same inputs, to fp32 rounding (measured
    ~3e-7 of the output's max). A fold that loses a learned clip or a transform factor changes
    the codes and fails here."""
    m = _model(family)
    ids = torch.randint(0, 79, (2, 16), generator=torch.Generator().manual_seed(3))
    x, kw = m.prepare_inputs(ids)
    x = x.detach()
    layer = m.layers[1]
    mc = m.config
    stats = {r: torch.rand(n) + 0.5 for r, n in (("qkv", 48), ("up_gate", 48), ("down", 96))}
    blk = FlatBlock(layer, m.layer_map(), num_heads=mc.num_attention_heads, num_kv_heads=mc.num_key_value_heads,
                    head_dim=mc.head_dim, w_bits=4, a_bits=4, act_stats=stats, seed=5, learn_clip=True)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    blk.install(layer)
    with torch.no_grad():  # learned clips in (0.6, 0.9): below 1, so clipping really happens
        for name, p in blk.named_parameters():
            if "logit" in name:
                p.copy_(0.4 + 1.8 * torch.rand(p.shape, generator=g))
    roles = {nm: role for role in FlatBlock.ROLES for nm in m.layer_map()[role]}
    inputs: dict[str, torch.Tensor] = {}
    hooks = [layer.get_submodule(nm).register_forward_pre_hook(
        lambda _m, args, nm=nm: inputs.__setitem__(nm, args[0].detach())) for nm in roles]
    with torch.no_grad():
        layer(x, **kw)
        for h in hooks:
            h.remove()
        trained = {nm: layer.get_submodule(nm)(inputs[nm]) for nm in roles}
        blk.fold(layer)
    cfg = MethodConfig(method="flatquant", quant=QuantConfig(w_bits=4, a_bits=4))
    ctx = _ctx(m, layer, x)
    _quantize_weights(layer, cfg, ctx, ctx.run_batches)  # RTN with each PendingLinear's clip
    with torch.no_grad():
        for nm, role in roles.items():
            ql = layer.get_submodule(nm)
            assert isinstance(ql, QuantLinear) and ql.uses_kernels, nm
            u = inputs[nm]
            if role in ("qkv", "up_gate"):  # the fold moved this 1/c into the preceding norm
                u = u / blk.c[role]
            want = trained[nm]
            got = ql(u)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()),
                                       msg=lambda s, nm=nm: f"{nm}: {s}")


def test_kron_split_real_dims() -> None:
    assert kron_split(4096) == (64, 64)
    assert kron_split(12288) == (96, 128)
    assert kron_split(3584) == (56, 64)
    assert kron_split(18944) == (128, 148)


def test_transform_leaves_other_blocks_alone() -> None:
    m = _model("llada")
    before = copy.deepcopy(m.layers[1].state_dict())
    cfg = MethodConfig(method="smoothquant", quant=FP)
    ids = torch.randint(0, 79, (2, 8))
    x, _ = m.prepare_inputs(ids)
    get_transform(cfg).transform_block(m.layers[0], _ctx(m, m.layers[0], x.detach()))
    after = m.layers[1].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_quarot_rotation_lowers_w4a4_error_on_outlier_channels(family: str) -> None:
    """QuaRot against RTN with the same clips (act clip 0.9, weight-clip search), so that the
    rotations are the only difference, on a model whose residual stream has two outlier
    channels: the Hadamard rotations spread them, so the W4A4 logits error is about halved.
    Replacing every rotation by the identity (still exact in full precision) makes the two
    equal and fails this test."""
    from fair_calib_ext.calib import calibrate
    from fair_calib_ext.models.testing import tiny_model

    m = tiny_model(family, seed=0, init_std=0.1, hidden_size=64, intermediate_size=128, head_dim=16)
    with torch.no_grad():
        m.embed_tokens.weight[:, [3, 40]] *= 30.0  # activation outliers in two channels
    g = torch.Generator().manual_seed(0)
    data, test = torch.randint(3, 90, (8, 32), generator=g), torch.randint(3, 90, (8, 32), generator=g)
    with torch.no_grad():
        ref = m(test).logits

    def rel_err(cfg: MethodConfig) -> float:
        q = copy.deepcopy(m)
        calibrate(q, cfg, data, progress=False)
        with torch.no_grad():
            return float((q(test).logits - ref).pow(2).mean() / ref.pow(2).mean())

    rtn = rel_err(MethodConfig(method="rtn", quant=QuantConfig.preset("w4a4", a_clip=0.9), w_clip_search=True))
    quarot = rel_err(MethodConfig(method="quarot", w_clip_search=True))
    assert quarot < 0.7 * rtn, (quarot, rtn)
