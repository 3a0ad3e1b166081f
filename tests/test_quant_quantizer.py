"""Reference quantizer vs the int4 kernels, fake-quant (STE), packing, clip search, modules."""

from __future__ import annotations

import pytest
import torch

from fair_calib_ext.quant.modules import OnlineTransform, QuantLinear, RefQuantLinear, kernels_available, kron_apply
from fair_calib_ext.quant.quantizer import (
    QuantConfig,
    compute_scale,
    dequantize,
    fake_quant,
    pack_int4_ref,
    quantize_ref,
    search_weight_clip,
    unpack_int4_ref,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


needs_kernels = pytest.mark.skipif(not kernels_available(), reason="fair _C kernels not built")


def _x(r: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(r, k, generator=g) * torch.rand(r, 1, generator=g) * 3
    x[0] = 0.0  # all-zero row -> scale 1
    x[1, :4] = torch.tensor([3.5, -3.5, 2.5, 7.0])  # exact .5 ties after /scale (absmax 7 -> scale 1)
    x[1, 4:] = 0.0
    return x


def test_quantize_ref_formula() -> None:
    x = _x(5, 16)
    q, s = quantize_ref(x, 4)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert s[0] == 1.0 and bool((q[0] == 0).all())
    # ties round half to even: 3.5 -> 4, -3.5 -> -4, 2.5 -> 2
    assert q[1, :4].tolist() == [4, -4, 2, 7]
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    assert torch.equal(s, compute_scale(x, 4).squeeze(-1))


@needs_kernels
@pytest.mark.parametrize("clip", [1.0, 0.9, 0.37])
@pytest.mark.parametrize("shape", [(7, 32), (33, 130), (3, 4096)])
def test_quantize_ref_matches_kernel_bitwise(clip: float, shape: tuple[int, int]) -> None:
    from fair_calib_ext import ops

    x = _x(*shape, seed=shape[1])
    q, s = quantize_ref(x, 4, clip)
    packed, ks = ops.quantize_int4(x, clip)
    assert torch.equal(s, ks)
    assert torch.equal(pack_int4_ref(q), packed)
    assert torch.equal(ops.unpack_int4(packed), q)


def test_pack_roundtrip() -> None:
    q = torch.randint(-8, 8, (6, 10), dtype=torch.int8)
    p = pack_int4_ref(q)
    assert p.shape == (6, 5) and p.dtype == torch.uint8
    assert torch.equal(unpack_int4_ref(p), q)
    assert int(p[0, 0]) == (int(q[0, 0]) & 0xF) | ((int(q[0, 1]) & 0xF) << 4)  # low nibble = even col


def test_fake_quant_equals_reference_and_ste() -> None:
    x = _x(9, 24).requires_grad_(True)
    clip = torch.full((9,), 0.9, requires_grad=True)
    y = fake_quant(x, 4, clip)
    q, s = quantize_ref(x.detach(), 4, clip.detach())
    assert torch.equal(y.detach(), dequantize(q, s))
    y.sum().backward()
    assert x.grad is not None and clip.grad is not None
    assert float(clip.grad.abs().sum()) > 0  # learnable clipping receives gradient
    assert torch.equal(fake_quant(x, 16), x)  # 16 bits = not quantized


def test_quant_config_validation() -> None:
    assert QuantConfig.preset("W4A8").a_bits == 8
    with pytest.raises(ValueError):
        QuantConfig(w_bits=3)
    with pytest.raises(ValueError):
        QuantConfig.preset("w2a2")
    with pytest.raises(ValueError):
        QuantConfig(a_clip=1.5)


def test_clip_search_not_worse_than_no_clip() -> None:
    w = torch.randn(16, 64)
    w[:, 0] *= 10  # outlier column makes shrinking worthwhile
    p = search_weight_clip(w, 4)
    err = lambda c: (fake_quant(w, 4, c) - w).abs().pow(2.4).sum(-1)  # noqa: E731
    assert bool((err(p) <= err(1.0) + 1e-6).all())
    assert float(p.min()) < 1.0


@needs_kernels
@pytest.mark.parametrize("act_clip", [1.0, 0.9])
def test_fake_quant_linear_matches_w4a4_kernel(act_clip: float) -> None:
    """RefQuantLinear (fake-quant in fp32) vs W4A4Linear on the same packed weights.

    Both quantize the activations with the same formula (fp32 division, round half even), so the
    integer codes are identical, ties included; the only difference is the order of fp32
    accumulation (the kernel sums int32 products exactly and scales once, the reference sums
    dequantized fp32 products), hence a tolerance of a few ulps of the output magnitude.
    """
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 96, generator=g)
    b = torch.randn(48, generator=g)
    x = torch.randn(2, 5, 96, generator=g)
    x[0, 0, :4] = torch.tensor([7.0, 3.5, -2.5, 0.5])  # with absmax 7 (clip 1) these are exact ties
    x[0, 0, 4:] = 0.0
    q, s = quantize_ref(w, 4)
    ref = QuantLinear.from_quantized(q, s, b, w_bits=4, a_bits=4, act_clip=act_clip, use_kernels=False)
    ker = QuantLinear.from_quantized(q, s, b, w_bits=4, a_bits=4, act_clip=act_clip, use_kernels=True)
    assert isinstance(ref.linear, RefQuantLinear) and ker.uses_kernels
    yr, yk = ref(x), ker(x)
    torch.testing.assert_close(yk, yr, rtol=1e-5, atol=1e-5)
    assert torch.equal(ref.int_weight(), ker.int_weight())


def test_online_kron_transform() -> None:
    a, bm = torch.randn(4, 4), torch.randn(6, 6)
    x = torch.randn(3, 24)
    t = OnlineTransform.kron(a, bm, 24)
    torch.testing.assert_close(t(x), x @ torch.kron(a, bm), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kron_apply(x, a, None), x @ torch.kron(a, torch.eye(6)), rtol=1e-5, atol=1e-5)
    t2 = OnlineTransform.from_spec(t.spec())
    t2.load_state_dict(t.state_dict())
    assert torch.equal(t2(x), t(x))
