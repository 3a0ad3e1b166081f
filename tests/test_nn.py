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
    assert q._prepacked is not None and q._prepacked.dtype == torch.uint8
    assert q._prepacked.numel() >= q.weight_packed.numel()  # 4 bits per weight, padded to tiles
    for x in (torch.randn(3, 64), torch.randn(2, 7, 64).bfloat16(), torch.randn(64).half()):
        assert torch.equal(q(x), ops.w4a4_linear(x, q.weight_packed, q.weight_scale, q.bias, 1.0))


def test_prepacked_state_dict_unchanged_and_refreshed_on_load(linear):
    q = W4A4Linear.from_linear(linear)
    assert set(q.state_dict()) == {"weight_packed", "weight_scale", "bias"}
    fresh = W4A4Linear(64, 24)
    x = torch.randn(5, 64)
    fresh(x)  # prepacks the zero weights
    fresh.load_state_dict(q.state_dict())  # in-place copy: the load hook re-prepacks
    assert torch.equal(fresh._prepacked, q._prepacked)
    assert torch.equal(fresh(x), q(x))


def test_prepacked_follows_weight_replacement_and_inplace_edits(linear):
    q = W4A4Linear.from_linear(linear)
    x = torch.randn(4, 64)
    other = W4A4Linear.from_linear(nn.Linear(64, 24))
    q.weight_packed = other.weight_packed.clone()  # replaced (as QuantLinear.from_quantized does)
    q.weight_scale = other.weight_scale.clone()
    q.bias = other.bias.clone()
    assert torch.equal(q(x), other(x))
    with torch.no_grad():
        q.weight_packed[0].fill_(0x77)  # modified in place: version bump
    expect = ops.w4a4_linear(x, q.weight_packed, q.weight_scale, q.bias, 1.0)
    assert torch.equal(q(x), expect)


def test_quant_linear_uses_prepacked_kernel_layout():
    from fair_calib_ext.quant.modules import QuantLinear

    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(-8, 8, (40, 96), dtype=torch.int8, generator=gen)
    scale = torch.rand(40, generator=gen) + 0.1
    m = QuantLinear.from_quantized(codes, scale, None, w_bits=4, a_bits=4, act_clip=1.0, use_kernels=True)
    assert m.uses_kernels and m.linear._prepacked is not None
    assert torch.equal(m.linear._prepacked, ops.prepack_int4(ops.pack_int4(codes)))
    x = torch.randn(3, 96, generator=gen)
    assert torch.equal(m(x), ops.w4a4_linear(x, m.linear.weight_packed, m.linear.weight_scale, None, 1.0))


def test_prepacked_under_inference_mode(linear):
    x = torch.randn(3, 64)
    with torch.inference_mode():
        q = W4A4Linear.from_linear(linear)  # inference tensors: no version counter
        y = q(x)
    assert torch.equal(y, ops.w4a4_linear(x, q.weight_packed, q.weight_scale, q.bias, 1.0))
    assert torch.equal(q(x), y)


def test_prepacked_copy_dropped_when_moved_off_cpu(linear):
    q = W4A4Linear.from_linear(linear)
    assert q._prepacked is not None
    q.to("meta")  # any non-CPU device: the CPU-only prepacked copy is released
    assert q._prepacked is None and q._prepacked_src is None
    q.to_empty(device="cpu")
    q.load_state_dict(W4A4Linear.from_linear(linear).state_dict())
    x = torch.randn(2, 64)
    assert torch.equal(q(x), ops.w4a4_linear(x, q.weight_packed, q.weight_scale, q.bias, 1.0))
