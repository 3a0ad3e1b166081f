"""Tests of fair_calib_ext.nn.W4A4Linear: from_linear, forward, state_dict, torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fair_calib_ext

if fair_calib_ext._C is None:
    pytest.skip(f"fair_calib_ext._C not built: {fair_calib_ext._C_ERROR}", allow_module_level=True)

from fair_calib_ext import ops  # noqa: E402
from fair_calib_ext.nn import W4A4Linear, quantize_weight  # noqa: E402


def _ref_weight_quant(w: torch.Tensor, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (clip.float() * w.float().abs().amax(1)) / 7.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(w.float() / scale[:, None]), -8, 7).to(torch.int8), scale


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight[3].zero_()  # an all-zero output channel: scale 1, codes 0
    return lin


def test_from_linear_float_clip(linear):
    q = W4A4Linear.from_linear(linear, w_clip=0.9, act_clip=0.8)
    codes, scale = _ref_weight_quant(linear.weight.detach(), torch.full((24,), 0.9))
    assert torch.equal(q.weight_scale, scale)
    assert torch.equal(ops.unpack_int4(q.weight_packed), codes)
    assert q.weight_scale[3] == 1.0
    assert q.act_clip == 0.8 and q.bias.dtype == torch.float32
    assert torch.equal(q.bias, linear.bias.detach())


def test_from_linear_per_channel_clip(linear):
    clip = torch.linspace(0.6, 1.0, 24)
    q = W4A4Linear.from_linear(linear, w_clip=clip)
    codes, scale = _ref_weight_quant(linear.weight.detach(), clip)
    assert torch.equal(q.weight_scale, scale)
    assert torch.equal(ops.unpack_int4(q.weight_packed), codes)
    # a constant tensor clip equals the float clip of the kernel quantizer
    a = W4A4Linear.from_linear(linear, w_clip=torch.full((24,), 0.75))
    b = W4A4Linear.from_linear(linear, w_clip=0.75)
    assert torch.equal(a.weight_packed, b.weight_packed) and torch.equal(a.weight_scale, b.weight_scale)


def test_from_linear_rejects_bad_input():
    with pytest.raises(ValueError, match="even"):
        W4A4Linear.from_linear(nn.Linear(7, 3))
    with pytest.raises(ValueError, match="Tensor\\[N\\]"):
        quantize_weight(torch.randn(3, 8), torch.ones(4))


def test_forward_matches_op_and_approximates_float(linear):
    q = W4A4Linear.from_linear(linear)
    x = torch.randn(2, 5, 64)
    out = q(x)
    assert out.shape == (2, 5, 24)
    assert torch.equal(out, ops.w4a4_linear(x, q.weight_packed, q.weight_scale, q.bias, 1.0))
    # int4 x int4 is coarse; the result must still track the float layer
    ref = linear(x)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.3, rel
    assert q(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip(linear, bias):
    lin = nn.Linear(64, 24, bias=bias)
    lin.load_state_dict({k: v for k, v in linear.state_dict().items() if bias or k != "bias"})
    q = W4A4Linear.from_linear(lin, act_clip=0.9)
    sd = q.state_dict()
    assert set(sd) == ({"weight_packed", "weight_scale", "bias"} if bias else {"weight_packed", "weight_scale"})
    fresh = W4A4Linear(64, 24, bias=bias, act_clip=0.9)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), q(x))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(linear, backend):
    torch._dynamo.reset()

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = W4A4Linear.from_linear(linear)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # only the custom op: inductor then emits no C++ kernel to compile (keeps the test fast)
            return self.proj(x)

    block = Block()
    x = torch.randn(4, 64)
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    assert torch.equal(compiled(x), block(x))
    x2 = torch.randn(7, 64)  # a second shape: recompiles (or runs dynamic) without graph breaks
    assert torch.equal(compiled(x2), block(x2))


# ---- CPU prepacked weights ------------------------------------------------------------------------


def test_prepacked_forward_is_bitwise_the_public_op(linear):
    q = W4A4Linear.from_linear(linear)
    assert q.prepacked is not None and q.prepacked.dtype == torch.uint8
    assert q.prepacked.numel() >= q.weight_packed.numel()  # 4 bits per weight, padded to tiles
    for x in (torch.randn(3, 64), torch.randn(2, 7, 64).bfloat16(), torch.randn(64).half()):
        assert torch.equal(q(x), ops.w4a4_linear(x, q.weight_packed, q.weight_scale, q.bias, 1.0))


@pytest.mark.parametrize("n,k", [(24, 64), (64, 64), (70, 130), (1, 2), (129, 200)])
def test_unprepack_inverts_prepack_exactly(n, k):
    from fair_calib_ext.nn import unprepack_int4

    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(n * k))
    assert torch.equal(unprepack_int4(ops.prepack_int4(w), n, k), w)
    with pytest.raises(ValueError, match="w_prepacked must be uint8"):
        unprepack_int4(ops.prepack_int4(w), n + 64, k)


def test_cpu_layer_holds_one_copy_of_the_weights(linear):
    """On CPU only the prepacked weights are stored: no public copy in buffers or attributes."""
    q = W4A4Linear.from_linear(linear)
    held = [t for t in list(q.buffers()) + [v for v in vars(q).values() if isinstance(v, torch.Tensor)]
            if t.dtype == torch.uint8]
    assert len(held) == 1 and held[0] is q.prepacked
    assert "weight_packed" not in dict(q.named_buffers())


def test_prepacked_state_dict_unchanged_and_refreshed_on_load(linear):
    q = W4A4Linear.from_linear(linear)
    assert set(q.state_dict()) == {"weight_packed", "weight_scale", "bias"}
    assert torch.equal(q.state_dict()["weight_packed"], quantize_weight(linear.weight)[0])
    fresh = W4A4Linear(64, 24)
    x = torch.randn(5, 64)
    fresh(x)  # the zero weights
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.prepacked, q.prepacked)
    assert torch.equal(fresh(x), q(x))
    on_meta = W4A4Linear(64, 24, device="meta")  # how checkpoints are loaded: assign, no zero buffers first
    on_meta.load_state_dict(q.state_dict(), assign=True)
    assert torch.equal(on_meta(x), q(x))


def test_load_state_dict_refuses_a_wrong_weight(linear):
    q = W4A4Linear.from_linear(linear)
    sd = q.state_dict()
    sd["weight_packed"] = sd["weight_packed"][:-1].clone()
    with pytest.raises(RuntimeError, match="weight_packed: expected uint8"):
        W4A4Linear(64, 24).load_state_dict(sd)
    sd.pop("weight_packed")
    with pytest.raises(RuntimeError, match="Missing key"):
        W4A4Linear(64, 24).load_state_dict(sd)


def test_weights_follow_replacement_and_refuse_inplace_edits(linear):
    q = W4A4Linear.from_linear(linear)
    x = torch.randn(4, 64)
    other = W4A4Linear.from_linear(nn.Linear(64, 24))
    q.weight_packed = other.weight_packed.clone()  # replaced (as QuantLinear.from_quantized does)
    q.weight_scale = other.weight_scale.clone()
    q.bias = other.bias.clone()
    assert torch.equal(q(x), other(x))
    # weight_packed is computed from the one stored copy: an in-place edit would be lost, so it raises
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        q.weight_packed[0].fill_(0x77)
    with pytest.raises(ValueError, match="weight_packed must be a uint8 tensor of shape"):
        q.weight_packed = torch.zeros(24, 31, dtype=torch.uint8)


def test_input_width_must_match_in_features():
    """A K that rounds up to the same padded width used to run as if zero-padded."""
    q = W4A4Linear.from_linear(nn.Linear(64, 32))
    for k in (62, 66, 0):
        with pytest.raises(ValueError, match=f"last dimension is {k}, expected in_features=64"):
            q(torch.randn(3, k))


@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("transform", [None, "hadamard"])
def test_quant_linear_refuses_another_input_width(use_kernels, transform):
    """Every QuantLinear path (kernels or fake-quant reference, with or without an online
    transform) names the expected width instead of padding, truncating or broadcasting."""
    from fair_calib_ext.quant.modules import OnlineTransform, QuantLinear

    t = OnlineTransform("hadamard", 64) if transform else None
    codes = torch.randint(-8, 8, (32, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    m = QuantLinear.from_quantized(codes, torch.ones(32), None, w_bits=4, a_bits=4, act_clip=1.0, transform=t,
                                   use_kernels=use_kernels)
    assert m(torch.randn(3, 64)).shape == (3, 32)
    for k in (62, 128):
        with pytest.raises(ValueError, match=f"last dimension is {k}, expected in_features=64"):
            m(torch.randn(3, k))


@pytest.mark.parametrize("kw,match", [
    ({"in_features": 64.0}, "in_features must be an integer"),
    ({"in_features": -2}, "in_features must be an integer >= 0"),
    ({"out_features": "8"}, "out_features must be an integer"),
    ({"act_clip": float("nan")}, "act_clip must be a finite number > 0"),
    ({"act_clip": 0.0}, "act_clip must be a finite number > 0"),
])
def test_constructor_refuses_bad_values(kw, match):
    args = {"in_features": 64, "out_features": 8, **kw}
    with pytest.raises(ValueError, match=match):
        W4A4Linear(**args)
    if "act_clip" in kw:
        with pytest.raises(ValueError, match=match):
            W4A4Linear.from_linear(nn.Linear(64, 8), act_clip=kw["act_clip"])
    with pytest.raises(TypeError, match="expected a torch.nn.Linear"):
        W4A4Linear.from_linear(nn.Conv1d(4, 4, 1))


def test_quant_linear_uses_prepacked_kernel_layout():
    from fair_calib_ext.quant.modules import QuantLinear

    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(-8, 8, (40, 96), dtype=torch.int8, generator=gen)
    scale = torch.rand(40, generator=gen) + 0.1
    m = QuantLinear.from_quantized(codes, scale, None, w_bits=4, a_bits=4, act_clip=1.0, use_kernels=True)
    assert m.uses_kernels and m.linear.prepacked is not None
    assert torch.equal(m.linear.prepacked, ops.prepack_int4(ops.pack_int4(codes)))
    x = torch.randn(3, 96, generator=gen)
    assert torch.equal(m(x), ops.w4a4_linear(x, m.linear.weight_packed, m.linear.weight_scale, None, 1.0))


def test_prepacked_under_inference_mode(linear):
    x = torch.randn(3, 64)
    with torch.inference_mode():
        q = W4A4Linear.from_linear(linear)
        y = q(x)
    assert torch.equal(y, ops.w4a4_linear(x, q.weight_packed, q.weight_scale, q.bias, 1.0))
    assert torch.equal(q(x), y)


def test_prepacked_copy_dropped_when_moved_off_cpu(linear):
    q = W4A4Linear.from_linear(linear)
    public = q.weight_packed.clone()
    q.to("meta")  # any non-CPU device: the CPU-only prepacked copy is released
    assert q.prepacked is None and q.weight_packed.device.type == "meta"
    q.to_empty(device="cpu")
    q.load_state_dict(W4A4Linear.from_linear(linear).state_dict())
    assert q.prepacked is not None and torch.equal(q.weight_packed, public)
    x = torch.randn(2, 64)
    assert torch.equal(q(x), ops.w4a4_linear(x, q.weight_packed, q.weight_scale, q.bias, 1.0))
