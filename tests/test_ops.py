"""Tests of the `fair` op library on CPU: exactness per ISA path, float outputs, quantizer,
bad input, weighted_mse and opcheck. Shapes are tiny; every supported ISA path is forced in turn
(paths the CPU lacks are skipped with the reason)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fair_calib_ext

if fair_calib_ext._C is None:
    pytest.skip(f"fair_calib_ext._C not built: {fair_calib_ext._C_ERROR}", allow_module_level=True)

from fair_calib_ext import ops  # noqa: E402
from pathlib import Path
# Subprocesses import the same fair_calib_ext as this process: the installed package in CI,
# the source tree (with its in-place build) in a developer checkout.
PKG_PARENT = str(Path(fair_calib_ext.__file__).resolve().parents[1])


from op_reference import isa_params  # noqa: E402  (tests/; also imported from here)

ISAS = isa_params()


@pytest.fixture(params=ISAS)
def isa(request):
    with ops.cpu_isa(request.param):
        yield request.param


# ---- pure-torch references: tests/op_reference.py ----------------------------------------

from op_reference import epilogue, exact_acc, rand_codes, ref_pack, ref_quantize  # noqa: E402  (tests/)


# ---- packing ----------------------------------------------------------------------------------


def test_pack_layout_low_nibble_is_even_column():
    q = torch.tensor([[1, -1, -8, 7, 0, 3]], dtype=torch.int8)
    p = ops.pack_int4(q)
    assert p.tolist() == [[0xF1, 0x78, 0x30]]
    assert torch.equal(ops.unpack_int4(p), q)


def test_pack_roundtrip_all_values_and_batch_dims():
    gen = torch.Generator().manual_seed(0)
    q = rand_codes(3, 4, 18, gen=gen)
    p = ops.pack_int4(q)
    assert p.shape == (3, 4, 9) and p.dtype == torch.uint8
    assert torch.equal(p, ref_pack(q))
    assert torch.equal(ops.unpack_int4(p), q)
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    assert torch.equal(ops.pack_int4(ops.unpack_int4(every_byte)), every_byte)


# ---- exactness of the int32 accumulator, per ISA path -----------------------------------------

GEMM_SHAPES = [  # (M, N, K): tile edges, K=2, K % 64 != 0, several K blocks, several M/N blocks
    (1, 1, 2),
    (1, 17, 64),
    (3, 5, 2),
    (7, 33, 130),
    (13, 31, 126),
    (6, 16, 192),
    (33, 47, 1000),
    (2, 65, 2 * 1024 + 66),
    (40, 130, 258),
    (1030, 3, 66),
]


@pytest.mark.parametrize("M,N,K", GEMM_SHAPES)
def test_gemm_int32_exact(isa, M, N, K):
    gen = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    qa, qw = rand_codes(M, K, gen=gen), rand_codes(N, K, gen=gen)
    acc = ops.w4a4_gemm(ops.pack_int4(qa), torch.ones(M), ops.pack_int4(qw), torch.ones(N), None, torch.int32)
    assert acc.dtype == torch.int32 and acc.shape == (M, N)
    assert torch.equal(acc, exact_acc(qa, qw))


@pytest.mark.parametrize("va,vw", [(-8, -8), (-8, 7), (7, 7), (7, -8)])
@pytest.mark.parametrize("K", [2, 62, 4096 + 64])
def test_gemm_int32_exact_extremes(isa, va, vw, K):
    M, N = 9, 35
    qa = torch.full((M, K), va, dtype=torch.int8)
    qw = torch.full((N, K), vw, dtype=torch.int8)
    acc = ops.w4a4_gemm(ops.pack_int4(qa), torch.ones(M), ops.pack_int4(qw), torch.ones(N), None, torch.int32)
    assert torch.equal(acc, torch.full((M, N), va * vw * K, dtype=torch.int32))


def test_isa_paths_agree_bitwise():
    """Every supported path gives bit-identical float outputs (same exact acc, same epilogue)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(37, 200, generator=gen)
    w, s = ops.quantize_int4(torch.randn(45, 200, generator=gen))
    bias = torch.randn(45, generator=gen)
    outs = {}
    for name in fair_calib_ext.build_info()["cpu_isa_supported"]:
        with ops.cpu_isa(name):
            outs[name] = ops.w4a4_linear(x, w, s, bias)
    first = next(iter(outs.values()))
    for name, out in outs.items():
        assert torch.equal(out, first), name


def test_vector_weight_packers_match_scalar():
    """Every supported vector prepacker equals the scalar one (channel and K edges), and every
    supported ISA gemm equals the scalar gemm on random prepacked blocks."""
    assert fair_calib_ext._C._selftest_pack_panels() == ""


# ---- float outputs ------------------------------------------------------------------------------

# Tolerances vs the float64 reference dequant(a) @ dequant(w).T (+ bias): the accumulator is exact,
# so the only errors are the fp32 epilogue (2-3 roundings, ~4e-7 relative) and the final cast.
TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-8, atol=1e-5),  # bf16: 8 significant bits
    torch.float16: dict(rtol=2**-11, atol=1e-5),  # fp16: 11 significant bits
}


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_float_outputs(isa, out_dtype, with_bias):
    gen = torch.Generator().manual_seed(11)
    M, N, K = 19, 37, 322
    qa, qw = rand_codes(M, K, gen=gen), rand_codes(N, K, gen=gen)
    sa = torch.rand(M, generator=gen) * 0.02 + 1e-3
    sw = torch.rand(N, generator=gen) * 0.02 + 1e-3
    bias = torch.randn(N, generator=gen).to(out_dtype) if with_bias else None
    out = ops.w4a4_gemm(ops.pack_int4(qa), sa, ops.pack_int4(qw), sw, bias, out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, N)
    # bit-exact against the defined fp32 epilogue
    assert torch.equal(out, epilogue(exact_acc(qa, qw), sa, sw, bias, out_dtype))
    ref = exact_acc(qa, qw).double() * sa.double()[:, None] * sw.double()[None, :]
    if bias is not None:
        ref = ref + bias.double()
    torch.testing.assert_close(out.double(), ref, **TOL[out_dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act_clip", [1.0, 0.8])
def test_linear_matches_reference(isa, dtype, act_clip):
    gen = torch.Generator().manual_seed(3)
    B, S, K, N = 2, 5, 192, 29
    x = (torch.randn(B, S, K, generator=gen) * 3).to(dtype)
    wq, ws = ref_quantize(torch.randn(N, K, generator=gen))
    bias = torch.randn(N, generator=gen)
    out = ops.w4a4_linear(x, ref_pack(wq), ws, bias, act_clip)
    assert out.shape == (B, S, N) and out.dtype == dtype
    qa, sa = ref_quantize(x.reshape(-1, K), act_clip)
    expect = epilogue(exact_acc(qa, wq), sa, ws, bias, dtype).reshape(B, S, N)
    assert torch.equal(out, expect)
    ref = exact_acc(qa, wq).double() * sa.double()[:, None] * ws.double()[None, :] + bias.double()
    torch.testing.assert_close(out.double().reshape(-1, N), ref, **TOL[dtype])


def test_linear_non_contiguous_and_1d(isa):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, 10, generator=gen).t()  # [10, 64], non-contiguous
    w, s = ops.quantize_int4(torch.randn(7, 64, generator=gen))
    assert not x.is_contiguous()
    assert torch.equal(ops.w4a4_linear(x, w, s), ops.w4a4_linear(x.contiguous(), w, s))
    assert torch.equal(ops.w4a4_linear(x[3], w, s), ops.w4a4_linear(x[3:4], w, s)[0])
    w_nc = torch.cat([w, w], dim=1)[:, : w.shape[1]]  # non-contiguous packed weights
    assert torch.equal(ops.w4a4_linear(x, w_nc, s), ops.w4a4_linear(x, w, s))


# ---- quantize_int4 ------------------------------------------------------------------------------


def test_quantize_ties_round_half_even(isa):
    x = torch.tensor([[7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 4.5, -3.5]])
    p, s = ops.quantize_int4(x)
    assert s.tolist() == [1.0]
    assert ops.unpack_int4(p).tolist() == [[7, 0, 2, 2, 0, -2, -2, 4, 4, -4]]


def test_quantize_zero_row_and_clip(isa):
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [-7.0, 7.0, 1.0, -3.0], [1e-45, 0.0, 0.0, 0.0]])
    p, s = ops.quantize_int4(x, 0.5)
    assert s.tolist() == [1.0, 0.5, 1.0]  # all-zero (and fully underflowed) rows get scale 1
    assert ops.unpack_int4(p).tolist() == [[0, 0, 0, 0], [-8, 7, 2, -6], [0, 0, 0, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("clip", [1.0, 0.9, 0.55, 1.25])
def test_quantize_bit_exact_vs_reference(isa, dtype, clip):
    gen = torch.Generator().manual_seed(int(clip * 100))
    x = (torch.randn(6, 3, 130, generator=gen) * torch.logspace(-3, 3, 6)[:, None, None]).to(dtype)
    x[0, 0, :] = 0
    # exact ties: row of multiples of 0.5 with absmax 7 gives scale 1 (for clip 1)
    x[1, 1, :16] = torch.arange(-8, 8) * 0.5
    x[1, 1, 16] = 7.0
    p, s = ops.quantize_int4(x, clip)
    q_ref, s_ref = ref_quantize(x, clip)
    assert torch.equal(s, s_ref)
    assert torch.equal(ops.unpack_int4(p), q_ref)
    assert torch.equal(p, ref_pack(q_ref))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_input_raises(isa, bad):
    x = torch.randn(3, 70)
    x[1, 65] = bad
    with pytest.raises(RuntimeError, match="inf or NaN in row 1"):
        ops.quantize_int4(x)
    w, s = ops.quantize_int4(torch.randn(4, 70))
    with pytest.raises(RuntimeError, match="inf or NaN in row 1"):
        ops.w4a4_linear(x, w, s)


# ---- bad input ----------------------------------------------------------------------------------


def _packed(m: int, k: int) -> torch.Tensor:
    return torch.zeros(m, k // 2, dtype=torch.uint8)


BAD_CASES = [
    ("pack odd K", lambda: ops.pack_int4(torch.zeros(2, 5, dtype=torch.int8)), "K must be even"),
    ("pack dtype", lambda: ops.pack_int4(torch.zeros(2, 4)), "q must be int8"),
    ("pack range", lambda: ops.pack_int4(torch.full((1, 2), 8, dtype=torch.int8)), r"\[-8, 7\]"),
    ("unpack dtype", lambda: ops.unpack_int4(torch.zeros(2, 4, dtype=torch.int8)), "packed must be uint8"),
    ("quant odd K", lambda: ops.quantize_int4(torch.zeros(2, 7)), "K must be even"),
    ("quant dtype", lambda: ops.quantize_int4(torch.zeros(2, 8, dtype=torch.int32)), "x must be float32"),
    ("quant clip", lambda: ops.quantize_int4(torch.zeros(2, 8), 0.0), "clip must be a finite number > 0"),
    (
        "gemm K mismatch",
        lambda: ops.w4a4_gemm(_packed(3, 8), torch.ones(3), _packed(4, 10), torch.ones(4)),
        "same packed K/2",
    ),
    (
        "gemm a dtype",
        lambda: ops.w4a4_gemm(torch.zeros(3, 4, dtype=torch.int8), torch.ones(3), _packed(4, 8), torch.ones(4)),
        "a must be uint8",
    ),
    (
        "gemm a_scale len",
        lambda: ops.w4a4_gemm(_packed(3, 8), torch.ones(2), _packed(4, 8), torch.ones(4)),
        r"a_scale must have shape \[M\] = \[3\]",
    ),
    (
        "gemm w_scale len",
        lambda: ops.w4a4_gemm(_packed(3, 8), torch.ones(3), _packed(4, 8), torch.ones(5)),
        r"w_scale must have shape \[N\] = \[4\]",
    ),
    (
        "gemm w_scale dtype",
        lambda: ops.w4a4_gemm(_packed(3, 8), torch.ones(3), _packed(4, 8), torch.ones(4, dtype=torch.float64)),
        "w_scale must be float32",
    ),
    (
        "gemm bias len",
        lambda: ops.w4a4_gemm(_packed(3, 8), torch.ones(3), _packed(4, 8), torch.ones(4), torch.ones(3)),
        r"bias must have shape \[N\] = \[4\]",
    ),
    (
        "gemm out dtype",
        lambda: ops.w4a4_gemm(_packed(3, 8), torch.ones(3), _packed(4, 8), torch.ones(4), None, torch.float64),
        "out_dtype must be",
    ),
    (
        "gemm int32 with bias",
        lambda: ops.w4a4_gemm(_packed(3, 8), torch.ones(3), _packed(4, 8), torch.ones(4), torch.ones(4), torch.int32),
        "bias must be None",
    ),
    ("linear odd K", lambda: ops.w4a4_linear(torch.zeros(2, 5), _packed(4, 6), torch.ones(4)), "K must be even"),
    (
        "linear K mismatch",
        lambda: ops.w4a4_linear(torch.zeros(2, 6), _packed(4, 8), torch.ones(4)),
        r"must equal 2 \* w.size\(1\) = 8",
    ),
    (
        "linear x dtype",
        lambda: ops.w4a4_linear(torch.zeros(2, 8, dtype=torch.int32), _packed(4, 8), torch.ones(4)),
        "x must be float32, bfloat16 or float16",
    ),
    (
        "linear w dtype",
        lambda: ops.w4a4_linear(torch.zeros(2, 8), torch.zeros(4, 4, dtype=torch.int8), torch.ones(4)),
        "w must be uint8",
    ),
    (
        "linear w_scale len",
        lambda: ops.w4a4_linear(torch.zeros(2, 8), _packed(4, 8), torch.ones(1)),
        r"w_scale must have shape \[N\]",
    ),
    (
        "linear act_clip",
        lambda: ops.w4a4_linear(torch.zeros(2, 8), _packed(4, 8), torch.ones(4), None, -1.0),
        "act_clip must be a finite number > 0",
    ),
    (
        "linear mixed devices",
        lambda: ops.w4a4_linear(torch.zeros(2, 8), _packed(4, 8).to("meta"), torch.ones(4)),
        "same device",
    ),
    (
        "gemm mixed devices",
        lambda: ops.w4a4_gemm(_packed(3, 8), torch.ones(3, device="meta"), _packed(4, 8), torch.ones(4)),
        "same device",
    ),
    (
        "mse shape mismatch",
        lambda: ops.weighted_mse(torch.zeros(3, 4), torch.zeros(3, 5), torch.ones(3)),
        "same shape",
    ),
    (
        "mse weight shape",
        lambda: ops.weighted_mse(torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(4)),
        "must broadcast",
    ),
    (
        "mse dtype mismatch",
        lambda: ops.weighted_mse(torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.float64), torch.ones(3)),
        "b must have a's dtype",
    ),
]


@pytest.mark.parametrize("fn,match", [pytest.param(f, m, id=i) for i, f, m in BAD_CASES])
def test_bad_input_raises_named_error(fn, match):
    with pytest.raises(RuntimeError, match=match):
        fn()


def test_empty_inputs_give_empty_results(isa):
    w, s = ops.quantize_int4(torch.randn(5, 8))
    out = ops.w4a4_linear(torch.zeros(0, 8), w, s)
    assert out.shape == (0, 5)
    out = ops.w4a4_linear(torch.zeros(2, 0, 8, dtype=torch.bfloat16), w, s)
    assert out.shape == (2, 0, 5) and out.dtype == torch.bfloat16
    assert ops.w4a4_gemm(_packed(0, 8), torch.ones(0), w, s).shape == (0, 5)
    p, sc = ops.quantize_int4(torch.zeros(0, 8))
    assert p.shape == (0, 4) and sc.shape == (0,)


# ---- weighted_mse -------------------------------------------------------------------------------


@pytest.mark.parametrize("w_shape", [(5,), (2, 5), (2, 1)])
def test_weighted_mse_forward(w_shape):
    gen = torch.Generator().manual_seed(8)
    a, b = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    w = torch.rand(w_shape, generator=gen)
    expect = (w * ((a - b) ** 2).sum(-1)).sum()
    torch.testing.assert_close(ops.weighted_mse(a, b, w), expect, rtol=1e-6, atol=0)
    out16 = ops.weighted_mse(a.bfloat16(), b.bfloat16(), w)
    assert out16.dtype == torch.bfloat16
    ref16 = (w.double() * ((a.bfloat16().double() - b.bfloat16().double()) ** 2).sum(-1)).sum()
    torch.testing.assert_close(out16.double(), ref16, rtol=2**-8, atol=0)


def test_weighted_mse_gradcheck():
    gen = torch.Generator().manual_seed(9)
    a = torch.randn(3, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(3, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(ops.weighted_mse, (a, b, w))


def test_weighted_mse_backward_matches_torch():
    gen = torch.Generator().manual_seed(10)
    a = torch.randn(6, 9, generator=gen, requires_grad=True)
    b = torch.randn(6, 9, generator=gen, requires_grad=True)
    w = torch.rand(6, generator=gen)
    (ops.weighted_mse(a, b, w) * 3.0).backward()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ((w * ((a2 - b2) ** 2).sum(-1)).sum() * 3.0).backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


# ---- w4a4_linear autograd: straight-through for x, exact for bias and w_scale ------------------------


def _ste_reference(x, w, w_scale, bias, act_clip):
    """The fake-quant forward with a straight-through activation quantizer, in plain torch:
    forward = dequant(quantize(x)) @ dequant(w)^T + bias, d/dx = identity through the quantizer."""
    qa, sa = ref_quantize(x.detach().reshape(-1, x.shape[-1]), act_clip)
    xq = (qa.float() * sa[:, None]).reshape(x.shape)
    x_ste = x.float() + (xq - x.float()).detach()
    w_deq = ops.unpack_int4(w).float() * w_scale[:, None]
    out = x_ste @ w_deq.T
    return (out + bias.float() if bias is not None else out).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_w4a4_linear_backward_matches_ste_of_fake_quant(dtype, with_bias):
    gen = torch.Generator().manual_seed(13)
    K, N = 64, 9
    x = (torch.randn(2, 3, K, generator=gen) * 2).to(dtype)
    w, s = ops.quantize_int4(torch.randn(N, K, generator=gen))
    s = s.clone().requires_grad_()
    bias = torch.randn(N, generator=gen).requires_grad_() if with_bias else None
    g = torch.randn(2, 3, N, generator=gen).to(dtype)

    xa = x.clone().requires_grad_()
    out = ops.w4a4_linear(xa, w, s, bias, 0.9)
    grads = torch.autograd.grad(out, [xa, s] + ([bias] if with_bias else []), g)

    xr, sr = x.clone().requires_grad_(), s.detach().clone().requires_grad_()
    br = bias.detach().clone().requires_grad_() if with_bias else None
    ref = _ste_reference(xr, w, sr, br, 0.9)
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref, **tol)
    want = torch.autograd.grad(ref, [xr, sr] + ([br] if with_bias else []), g)
    assert grads[0].dtype == dtype and grads[0].shape == x.shape
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got.float(), exp.float(), rtol=tol["rtol"] * 4, atol=1e-4)


def test_w4a4_linear_backward_reaches_x_through_a_module():
    """The reported failure: the output required grad but x.grad stayed None after backward."""
    w, s = ops.quantize_int4(torch.randn(5, 32))
    x = torch.randn(4, 32, requires_grad=True)
    ops.w4a4_linear(x, w, s).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, (ops.unpack_int4(w).float() * s[:, None]).sum(0).expand(4, 32))


# ---- opcheck ------------------------------------------------------------------------------------


def _opcheck_cases():
    gen = torch.Generator().manual_seed(12)
    q = rand_codes(5, 10, gen=gen)
    x = torch.randn(2, 3, 64, generator=gen)
    w, s = ops.quantize_int4(torch.randn(9, 64, generator=gen))
    a, sa = ops.quantize_int4(x.reshape(-1, 64))
    bias = torch.randn(9, generator=gen)
    fa = torch.randn(2, 4, 5, generator=gen, requires_grad=True)
    fb = torch.randn(2, 4, 5, generator=gen, requires_grad=True)
    fw = torch.rand(4, generator=gen)
    return [
        ("pack_int4", (q,)),
        ("unpack_int4", (ops.pack_int4(q),)),
        ("quantize_int4", (x, 0.9)),
        ("w4a4_gemm", (a, sa, w, s, bias, torch.bfloat16)),
        ("w4a4_gemm", (a, sa, w, s, None, torch.int32)),
        ("w4a4_linear", (x, w, s, bias, 1.0)),
        ("w4a4_linear", (x.half(), w, s, None, 0.7)),
        ("w4a4_linear", (x.clone().requires_grad_(), w, s.clone().requires_grad_(),
                         bias.clone().requires_grad_(), 0.8)),
        ("weighted_mse", (fa, fb, fw)),
        ("weighted_mse_backward", (torch.tensor(2.0), fa.detach(), fb.detach(), fw)),
    ]


@pytest.mark.parametrize("name,args", [pytest.param(n, a, id=f"{n}-{i}") for i, (n, a) in enumerate(_opcheck_cases())])
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.fair, name).default, args)


# ---- build info and ISA selection -----------------------------------------------------------------


def test_build_info():
    info = fair_calib_ext.build_info()
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda"], bool) and isinstance(info["cuda_archs"], list)
    assert "scalar" in info["cpu_isa_compiled"] and "scalar" in info["cpu_isa_supported"]
    assert info["cpu_isa"] in info["cpu_isa_supported"]


def test_set_cpu_isa_rejects_unknown_and_unsupported():
    with pytest.raises(ValueError, match="unknown CPU ISA path"):
        ops.set_cpu_isa("sse9")
    unsupported = [n for n in ops.CPU_ISAS if not ops.cpu_isa_supported(n)]
    for name in unsupported:
        with pytest.raises(ValueError, match="not supported"):
            ops.set_cpu_isa(name)


def test_env_override_value_handling():
    """FAIR_CPU_ISA semantics (same code as the once-per-process read): a supported name is
    taken, an unknown name is an error, a known but unsupported one falls back with a warning."""
    assert fair_calib_ext._C._isa_for_env("scalar") == "scalar"
    best = fair_calib_ext.build_info()["cpu_isa_supported"][-1]
    assert fair_calib_ext._C._isa_for_env("auto") == best
    assert fair_calib_ext._C._isa_for_env("") == best
    with pytest.raises(RuntimeError, match="FAIR_CPU_ISA=avx9000 is not one of"):
        fair_calib_ext._C._isa_for_env("avx9000")
    for name in (n for n in ops.CPU_ISAS if not ops.cpu_isa_supported(n)):
        with pytest.warns(UserWarning, match="not supported"):
            assert fair_calib_ext._C._isa_for_env(name) == best


def test_env_override_in_new_process(tmp_path):
    code = (
        "import torch, fair_calib_ext\n"
        "from fair_calib_ext import ops\n"
        "w, s = ops.quantize_int4(torch.randn(3, 8))\n"
        "ops.w4a4_linear(torch.randn(2, 8), w, s)\n"
        "print('ISA=' + ops.get_cpu_isa())\n"
    )
    # same import resolution as this process (source tree or installed package)
    env = dict(os.environ, FAIR_CPU_ISA="scalar", PYTHONPATH=PKG_PARENT)
    # run outside the repository: `python -c` puts the working directory first on sys.path
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert "ISA=scalar" in res.stdout


# ---- overflow: a finite input never gives a silently wrong result ---------------------------------


def test_weighted_mse_overflows_to_inf_not_an_error():
    """Finite inputs whose sum exceeds the output dtype give inf (like torch's own reductions)."""
    a = torch.full((2, 3, 4), 1e20)
    b = -a
    out = ops.weighted_mse(a, b, torch.ones(3))
    assert out.dtype == torch.float32 and out.item() == float("inf")
    out16 = ops.weighted_mse(torch.full((2, 4), 300.0, dtype=torch.float16),
                             torch.full((2, 4), -300.0, dtype=torch.float16), torch.ones(2))
    assert out16.dtype == torch.float16 and out16.item() == float("inf")


@pytest.mark.parametrize("clip", [8.0, 2.0])
def test_quantize_scale_overflow_raises(isa, clip):
    """clip * absmax / 7 beyond float32 would be an infinite scale and all-zero codes: refused,
    naming x and clip (and the row); with the same rows a clip that fits still works."""
    x = torch.randn(3, 64)
    x[2, 5] = 3e38
    with pytest.raises(RuntimeError, match=r"quantize_int4: .*row 2.*clip"):
        ops.quantize_int4(x, clip)
    w, s = ops.quantize_int4(torch.randn(4, 64))
    with pytest.raises(RuntimeError, match=r"w4a4_linear: .*row 2.*act_clip"):
        ops.w4a4_linear(x, w, s, None, clip)
    p, sc = ops.quantize_int4(x, 1.0)
    assert torch.isfinite(sc).all() and ops.unpack_int4(p)[2, 5] == 7


# ---- multi-threaded GEMM driver (problems >= 2^22 MACs spread over at::parallel_for) ---------------


@pytest.mark.parametrize("M,N,K", [(61, 197, 2 * 1024 + 130), (300, 40, 400)])  # N- and M-split tasks
def test_gemm_multithreaded_int32_exact(isa, M, N, K):
    assert M * N * K >= 1 << 22  # above the driver's single-thread threshold
    gen = torch.Generator().manual_seed(M + N + K)
    qa, qw = rand_codes(M, K, gen=gen), rand_codes(N, K, gen=gen)
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.get_num_threads() == 2
        acc = ops.w4a4_gemm(ops.pack_int4(qa), torch.ones(M), ops.pack_int4(qw), torch.ones(N), None, torch.int32)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(acc, exact_acc(qa, qw))
