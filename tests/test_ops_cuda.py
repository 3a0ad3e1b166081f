"""Tests of the `fair` op library on CUDA (csrc/cuda/): the CPU suite's references, on the GPU.

Everything here needs a CUDA device and an extension built with the CUDA kernels; otherwise the
whole module is skipped with the reason. The GEMM is checked on each of its paths, forced with
FAIR_CUDA_GEMM_PATH (read on every call): ``int4`` (mma.sync m16n8k64 s4; on sm_90+ it runs the
s8 MMA, see w4a4_gemm.cu), ``int8`` (s4 -> s8 unpack, mma.sync m16n8k32 s8) and ``simt``.
References are computed on the CPU in float64 / exact integers, as in tests/test_ops.py.
"""

from __future__ import annotations

import pytest
import torch

import fair_calib_ext

if fair_calib_ext._C is None:
    pytest.skip(f"fair_calib_ext._C not built: {fair_calib_ext._C_ERROR}", allow_module_level=True)
if not torch.cuda.is_available():
    pytest.skip("no CUDA device (torch.cuda.is_available() is False): the CUDA op tests need a GPU",
                allow_module_level=True)
if not fair_calib_ext.build_info()["cuda"]:
    pytest.skip("fair_calib_ext._C was built without the CUDA kernels (CPU torch or no nvcc at build time)",
                allow_module_level=True)
if torch.cuda.get_device_capability() < (8, 0):
    pytest.skip(f"GPU {torch.cuda.get_device_name()} is older than sm_80; the fair kernels need sm_80+",
                allow_module_level=True)

from fair_calib_ext import ops  # noqa: E402

DEV = torch.device("cuda")
PATHS = ["int4", "int8", "simt"]


@pytest.fixture(params=PATHS)
def gemm_path(request, monkeypatch):
    monkeypatch.setenv("FAIR_CUDA_GEMM_PATH", request.param)
    monkeypatch.delenv("FAIR_CUDA_FORCE_INT8", raising=False)
    return request.param


# ---- pure-torch references (CPU): tests/op_reference.py ----------------------------------

from op_reference import epilogue, exact_acc, rand_codes, ref_pack, ref_quantize  # noqa: E402  (tests/)


def cuda(*ts):
    return tuple(t.to(DEV) if isinstance(t, torch.Tensor) else t for t in ts)


# ---- packing ----------------------------------------------------------------------------------


def test_pack_roundtrip_on_cuda():
    gen = torch.Generator().manual_seed(0)
    q = rand_codes(3, 4, 18, gen=gen)
    p = ops.pack_int4(q.to(DEV))
    assert p.device.type == "cuda" and p.shape == (3, 4, 9)
    assert torch.equal(p.cpu(), ref_pack(q))
    assert torch.equal(ops.unpack_int4(p).cpu(), q)
    every_byte = torch.arange(256, dtype=torch.uint8, device=DEV).reshape(16, 16)
    assert torch.equal(ops.pack_int4(ops.unpack_int4(every_byte)), every_byte)


# ---- exactness of the int32 accumulator, per GEMM path ------------------------------------------

GEMM_SHAPES = [  # every tile config (M <= 16, <= 64, <= 512, > 512), tile edges, K % 32 != 0
    (1, 1, 2),
    (1, 17, 64),
    (3, 5, 2),
    (7, 33, 130),
    (16, 64, 256),
    (17, 65, 288),
    (13, 31, 126),
    (33, 47, 1000),
    (64, 128, 512),
    (65, 129, 96),
    (2, 65, 2 * 1024 + 64),
    (40, 130, 258),
    (300, 257, 320),
    (513, 255, 192),
    (1030, 3, 64),
]


@pytest.mark.parametrize("M,N,K", GEMM_SHAPES)
def test_gemm_int32_exact(gemm_path, M, N, K):
    gen = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    qa, qw = rand_codes(M, K, gen=gen), rand_codes(N, K, gen=gen)
    a, w = ref_pack(qa).to(DEV), ref_pack(qw).to(DEV)
    acc = ops.w4a4_gemm(a, torch.ones(M, device=DEV), w, torch.ones(N, device=DEV), None, torch.int32)
    assert acc.dtype == torch.int32 and acc.shape == (M, N) and acc.device.type == "cuda"
    assert torch.equal(acc.cpu(), exact_acc(qa, qw))


@pytest.mark.parametrize("va,vw", [(-8, -8), (-8, 7), (7, 7), (7, -8)])
@pytest.mark.parametrize("K", [2, 62, 4096 + 64])
def test_gemm_int32_exact_extremes(gemm_path, va, vw, K):
    M, N = 9, 35
    a = ref_pack(torch.full((M, K), va, dtype=torch.int8)).to(DEV)
    w = ref_pack(torch.full((N, K), vw, dtype=torch.int8)).to(DEV)
    acc = ops.w4a4_gemm(a, torch.ones(M, device=DEV), w, torch.ones(N, device=DEV), None, torch.int32)
    assert torch.equal(acc.cpu(), torch.full((M, N), va * vw * K, dtype=torch.int32))


def test_gemm_unaligned_operands_take_the_fallback_and_stay_exact():
    gen = torch.Generator().manual_seed(1)
    M, N, K = 20, 24, 128
    qa, qw = rand_codes(M, K, gen=gen), rand_codes(N, K, gen=gen)
    buf = torch.empty(M * K // 2 + 1, dtype=torch.uint8, device=DEV)
    a = buf[1:].view(M, K // 2)  # contiguous but 1 byte off 16-byte alignment
    a.copy_(ref_pack(qa).to(DEV))
    acc = ops.w4a4_gemm(a, torch.ones(M, device=DEV), ref_pack(qw).to(DEV), torch.ones(N, device=DEV), None,
                        torch.int32)
    assert torch.equal(acc.cpu(), exact_acc(qa, qw))


def test_paths_agree_bitwise(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(37, 256, generator=gen).to(DEV)
    w, s = ops.quantize_int4(torch.randn(45, 256, generator=gen).to(DEV))
    bias = torch.randn(45, generator=gen).to(DEV)
    outs = {}
    for path in PATHS:
        monkeypatch.setenv("FAIR_CUDA_GEMM_PATH", path)
        outs[path] = ops.w4a4_linear(x, w, s, bias)
    monkeypatch.delenv("FAIR_CUDA_GEMM_PATH")
    monkeypatch.setenv("FAIR_CUDA_FORCE_INT8", "1")
    outs["force_int8"] = ops.w4a4_linear(x, w, s, bias)
    for name, out in outs.items():
        assert torch.equal(out, outs["simt"]), name


def test_cuda_matches_cpu_op_bitwise():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 11, 320, generator=gen).bfloat16()
    w, s = ops.quantize_int4(torch.randn(70, 320, generator=gen))
    bias = torch.randn(70, generator=gen)
    expect = ops.w4a4_linear(x, w, s, bias)
    got = ops.w4a4_linear(*cuda(x, w, s, bias))
    assert torch.equal(got.cpu(), expect)


def test_bad_gemm_path_env_raises(monkeypatch):
    monkeypatch.setenv("FAIR_CUDA_GEMM_PATH", "fp8")
    w, s = ops.quantize_int4(torch.randn(4, 64, device=DEV))
    with pytest.raises(RuntimeError, match="FAIR_CUDA_GEMM_PATH must be one of"):
        ops.w4a4_linear(torch.randn(2, 64, device=DEV), w, s)


# ---- float outputs ------------------------------------------------------------------------------

TOL = {  # vs float64; the accumulator is exact, so only the fp32 epilogue and the cast round
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-8, atol=1e-5),
    torch.float16: dict(rtol=2**-11, atol=1e-5),
}


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_float_outputs(gemm_path, out_dtype, with_bias):
    gen = torch.Generator().manual_seed(11)
    M, N, K = 19, 37, 320
    qa, qw = rand_codes(M, K, gen=gen), rand_codes(N, K, gen=gen)
    sa = torch.rand(M, generator=gen) * 0.02 + 1e-3
    sw = torch.rand(N, generator=gen) * 0.02 + 1e-3
    bias = torch.randn(N, generator=gen).to(out_dtype) if with_bias else None
    out = ops.w4a4_gemm(*cuda(ref_pack(qa), sa, ref_pack(qw), sw, bias), out_dtype).cpu()
    assert out.dtype == out_dtype and out.shape == (M, N)
    assert torch.equal(out, epilogue(exact_acc(qa, qw), sa, sw, bias, out_dtype))
    ref = (qa.double() * sa.double()[:, None]) @ (qw.double() * sw.double()[:, None]).T
    if bias is not None:
        ref = ref + bias.double()
    torch.testing.assert_close(out.double(), ref, **TOL[out_dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act_clip", [1.0, 0.8])
@pytest.mark.parametrize("K", [192, 130])
def test_linear_matches_reference(gemm_path, dtype, act_clip, K):
    gen = torch.Generator().manual_seed(3)
    B, S, N = 2, 5, 29
    x = (torch.randn(B, S, K, generator=gen) * 3).to(dtype)
    wq, ws = ref_quantize(torch.randn(N, K, generator=gen))
    bias = torch.randn(N, generator=gen)
    out = ops.w4a4_linear(*cuda(x, ref_pack(wq), ws, bias), act_clip).cpu()
    assert out.shape == (B, S, N) and out.dtype == dtype
    qa, sa = ref_quantize(x.reshape(-1, K), act_clip)
    assert torch.equal(out, epilogue(exact_acc(qa, wq), sa, ws, bias, dtype).reshape(B, S, N))
    ref = (qa.double() * sa.double()[:, None]) @ (wq.double() * ws.double()[:, None]).T + bias.double()
    torch.testing.assert_close(out.double().reshape(-1, N), ref, **TOL[dtype])


def test_linear_non_contiguous_and_1d():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, 10, generator=gen, device="cpu").to(DEV).t()
    w, s = ops.quantize_int4(torch.randn(7, 64, generator=gen).to(DEV))
    assert not x.is_contiguous()
    assert torch.equal(ops.w4a4_linear(x, w, s), ops.w4a4_linear(x.contiguous(), w, s))
    assert torch.equal(ops.w4a4_linear(x[3], w, s), ops.w4a4_linear(x[3:4], w, s)[0])
    w_nc = torch.cat([w, w], dim=1)[:, : w.shape[1]]
    assert torch.equal(ops.w4a4_linear(x, w_nc, s), ops.w4a4_linear(x, w, s))


def test_linear_on_a_side_stream_and_second_device_index():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(33, 128, generator=gen)
    w, s = ops.quantize_int4(torch.randn(40, 128, generator=gen))
    expect = ops.w4a4_linear(x, w, s)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = ops.w4a4_linear(*cuda(x, w, s))
    stream.synchronize()
    assert torch.equal(got.cpu(), expect)
    if torch.cuda.device_count() > 1:
        d1 = torch.device("cuda", 1)
        got1 = ops.w4a4_linear(x.to(d1), w.to(d1), s.to(d1))
        assert got1.device == d1 and torch.equal(got1.cpu(), expect)


# ---- quantize_int4 ------------------------------------------------------------------------------


def test_quantize_ties_round_half_even():
    x = torch.tensor([[7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 4.5, -3.5]], device=DEV)
    p, s = ops.quantize_int4(x)
    assert s.tolist() == [1.0]
    assert ops.unpack_int4(p).tolist() == [[7, 0, 2, 2, 0, -2, -2, 4, 4, -4]]


def test_quantize_zero_row_and_clip():
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [-7.0, 7.0, 1.0, -3.0], [1e-45, 0.0, 0.0, 0.0]], device=DEV)
    p, s = ops.quantize_int4(x, 0.5)
    assert s.tolist() == [1.0, 0.5, 1.0]
    assert ops.unpack_int4(p).tolist() == [[0, 0, 0, 0], [-8, 7, 2, -6], [0, 0, 0, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("clip", [1.0, 0.9, 0.55, 1.25])
@pytest.mark.parametrize("K", [130, 256])  # scalar path (K % 8 != 0) and vector path
def test_quantize_bit_exact_vs_reference(dtype, clip, K):
    gen = torch.Generator().manual_seed(int(clip * 100) + K)
    x = (torch.randn(6, 3, K, generator=gen) * torch.logspace(-3, 3, 6)[:, None, None]).to(dtype)
    x[0, 0, :] = 0
    x[1, 1, :16] = torch.arange(-8, 8) * 0.5
    x[1, 1, 16] = 7.0
    p, s = ops.quantize_int4(x.to(DEV), clip)
    q_ref, s_ref = ref_quantize(x, clip)
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(p.cpu(), ref_pack(q_ref))


def test_quantize_unaligned_rows_bit_exact():
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(5, 257, generator=gen)[:, 1:]  # rows start 4 bytes off alignment
    p, s = ops.quantize_int4(x.to(DEV))
    q_ref, s_ref = ref_quantize(x)
    assert torch.equal(s.cpu(), s_ref) and torch.equal(p.cpu(), ref_pack(q_ref))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_input(bad):
    x = torch.randn(3, 70)
    x[1, 65] = bad
    with pytest.raises(RuntimeError, match="inf or NaN in row 1"):
        ops.quantize_int4(x.to(DEV))
    # w4a4_linear cannot raise without a device sync on every call: the row's outputs are NaN.
    w, s = ops.quantize_int4(torch.randn(4, 70))
    out = ops.w4a4_linear(*cuda(x, w, s)).cpu()
    assert out[1].isnan().all()
    keep = torch.tensor([0, 2])
    assert torch.equal(out[keep], ops.w4a4_linear(x[keep], w, s))


@pytest.mark.parametrize("clip", [8.0, 2.0])
def test_quantize_scale_overflow(clip):
    """clip * absmax / 7 beyond float32: quantize_int4 raises as on the CPU; w4a4_linear (no
    device sync) gives NaN for that row instead of silent zeros."""
    x = torch.randn(3, 64)
    x[2, 5] = 3e38
    with pytest.raises(RuntimeError, match=r"quantize_int4: .*row 2.*clip"):
        ops.quantize_int4(x.to(DEV), clip)
    w, s = ops.quantize_int4(torch.randn(4, 64))
    out = ops.w4a4_linear(*cuda(x, w, s), None, clip).cpu()
    assert out[2].isnan().all() and torch.isfinite(out[:2]).all()


# ---- bad input ----------------------------------------------------------------------------------


def _packed(m: int, k: int, device=DEV) -> torch.Tensor:
    return torch.zeros(m, k // 2, dtype=torch.uint8, device=device)


def _ones(n: int, **kw) -> torch.Tensor:
    return torch.ones(n, device=kw.pop("device", DEV), **kw)


def _z(*shape, **kw) -> torch.Tensor:
    return torch.zeros(*shape, device=kw.pop("device", DEV), **kw)


BAD_CASES = [
    ("pack odd K", lambda: ops.pack_int4(_z(2, 5, dtype=torch.int8)), "K must be even"),
    ("pack dtype", lambda: ops.pack_int4(_z(2, 4)), "q must be int8"),
    ("pack range", lambda: ops.pack_int4(torch.full((1, 2), 8, dtype=torch.int8, device=DEV)), r"\[-8, 7\]"),
    ("unpack dtype", lambda: ops.unpack_int4(_z(2, 4, dtype=torch.int8)), "packed must be uint8"),
    ("quant odd K", lambda: ops.quantize_int4(_z(2, 7)), "K must be even"),
    ("quant dtype", lambda: ops.quantize_int4(_z(2, 8, dtype=torch.int32)), "x must be float32"),
    ("quant clip", lambda: ops.quantize_int4(_z(2, 8), 0.0), "clip must be a finite number > 0"),
    ("gemm K mismatch", lambda: ops.w4a4_gemm(_packed(3, 8), _ones(3), _packed(4, 10), _ones(4)), "same packed K/2"),
    ("gemm a dtype", lambda: ops.w4a4_gemm(_z(3, 4, dtype=torch.int8), _ones(3), _packed(4, 8), _ones(4)),
     "a must be uint8"),
    ("gemm a_scale len", lambda: ops.w4a4_gemm(_packed(3, 8), _ones(2), _packed(4, 8), _ones(4)),
     r"a_scale must have shape \[M\] = \[3\]"),
    ("gemm w_scale len", lambda: ops.w4a4_gemm(_packed(3, 8), _ones(3), _packed(4, 8), _ones(5)),
     r"w_scale must have shape \[N\] = \[4\]"),
    ("gemm w_scale dtype", lambda: ops.w4a4_gemm(_packed(3, 8), _ones(3), _packed(4, 8), _ones(4, dtype=torch.float64)),
     "w_scale must be float32"),
    ("gemm bias len", lambda: ops.w4a4_gemm(_packed(3, 8), _ones(3), _packed(4, 8), _ones(4), _ones(3)),
     r"bias must have shape \[N\] = \[4\]"),
    ("gemm out dtype", lambda: ops.w4a4_gemm(_packed(3, 8), _ones(3), _packed(4, 8), _ones(4), None, torch.float64),
     "out_dtype must be"),
    ("gemm int32 with bias", lambda: ops.w4a4_gemm(_packed(3, 8), _ones(3), _packed(4, 8), _ones(4), _ones(4), torch.int32),
     "bias must be None"),
    ("linear odd K", lambda: ops.w4a4_linear(_z(2, 5), _packed(4, 6), _ones(4)), "K must be even"),
    ("linear K mismatch", lambda: ops.w4a4_linear(_z(2, 6), _packed(4, 8), _ones(4)), r"must equal 2 \* w.size\(1\) = 8"),
    ("linear x dtype", lambda: ops.w4a4_linear(_z(2, 8, dtype=torch.int32), _packed(4, 8), _ones(4)),
     "x must be float32, bfloat16 or float16"),
    ("linear w dtype", lambda: ops.w4a4_linear(_z(2, 8), _z(4, 4, dtype=torch.int8), _ones(4)), "w must be uint8"),
    ("linear w_scale len", lambda: ops.w4a4_linear(_z(2, 8), _packed(4, 8), _ones(1)), r"w_scale must have shape \[N\]"),
    ("linear act_clip", lambda: ops.w4a4_linear(_z(2, 8), _packed(4, 8), _ones(4), None, -1.0),
     "act_clip must be a finite number > 0"),
    ("linear w on cpu", lambda: ops.w4a4_linear(_z(2, 8), _packed(4, 8, device="cpu"), _ones(4)), "same device"),
    ("linear x on cpu", lambda: ops.w4a4_linear(_z(2, 8, device="cpu"), _packed(4, 8), _ones(4)), "same device"),
    ("gemm a_scale on cpu", lambda: ops.w4a4_gemm(_packed(3, 8), _ones(3, device="cpu"), _packed(4, 8), _ones(4)),
     "same device"),
    ("gemm bias on cpu", lambda: ops.w4a4_gemm(_packed(3, 8), _ones(3), _packed(4, 8), _ones(4), _ones(4, device="cpu")),
     "same device"),
    ("mse shape mismatch", lambda: ops.weighted_mse(_z(3, 4), _z(3, 5), _ones(3)), "same shape"),
    ("mse weight shape", lambda: ops.weighted_mse(_z(3, 4), _z(3, 4), _ones(4)), "must broadcast"),
    ("mse dtype mismatch", lambda: ops.weighted_mse(_z(3, 4), _z(3, 4, dtype=torch.float64), _ones(3)),
     "b must have a's dtype"),
    ("mse w on cpu", lambda: ops.weighted_mse(_z(3, 4), _z(3, 4), _ones(3, device="cpu")), "same device"),
]


@pytest.mark.parametrize("fn,match", [pytest.param(f, m, id=i) for i, f, m in BAD_CASES])
def test_bad_input_raises_named_error(fn, match):
    with pytest.raises(RuntimeError, match=match):
        fn()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs to mix devices")
def test_tensors_on_different_gpus_raise():
    d1 = torch.device("cuda", 1)
    w, s = ops.quantize_int4(torch.randn(4, 64, device=DEV))
    with pytest.raises(RuntimeError, match="same device"):
        ops.w4a4_linear(torch.randn(2, 64, device=d1), w, s)
    with pytest.raises(RuntimeError, match="same device"):
        ops.weighted_mse(_z(3, 4), _z(3, 4, device=d1), _ones(3))


def test_empty_inputs_give_empty_results():
    w, s = ops.quantize_int4(torch.randn(5, 8, device=DEV))
    assert ops.w4a4_linear(_z(0, 8), w, s).shape == (0, 5)
    out = ops.w4a4_linear(_z(2, 0, 8, dtype=torch.bfloat16), w, s)
    assert out.shape == (2, 0, 5) and out.dtype == torch.bfloat16
    assert ops.w4a4_gemm(_packed(0, 8), _ones(0), w, s).shape == (0, 5)
    p, sc = ops.quantize_int4(_z(0, 8))
    assert p.shape == (0, 4) and sc.shape == (0,)


# ---- weighted_mse -------------------------------------------------------------------------------


@pytest.mark.parametrize("w_shape", [(5,), (2, 5), (2, 1)])
def test_weighted_mse_forward(w_shape):
    gen = torch.Generator().manual_seed(8)
    a, b = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    w = torch.rand(w_shape, generator=gen)
    expect = (w.double() * ((a.double() - b.double()) ** 2).sum(-1)).sum()
    out = ops.weighted_mse(*cuda(a, b, w))
    assert out.dtype == torch.float32 and out.dim() == 0
    torch.testing.assert_close(out.cpu().double(), expect, rtol=1e-5, atol=0)  # fp32 accumulation
    out16 = ops.weighted_mse(*cuda(a.bfloat16(), b.bfloat16(), w))
    assert out16.dtype == torch.bfloat16
    ref16 = (w.double() * ((a.bfloat16().double() - b.bfloat16().double()) ** 2).sum(-1)).sum()
    torch.testing.assert_close(out16.cpu().double(), ref16, rtol=2**-7, atol=0)


def test_weighted_mse_large_is_deterministic_and_accurate():
    gen = torch.Generator().manual_seed(14)
    a, b = torch.randn(4, 300, 1000, generator=gen), torch.randn(4, 300, 1000, generator=gen)
    w = torch.rand(300, generator=gen)
    ad, bd, wd = cuda(a, b, w)
    first = ops.weighted_mse(ad, bd, wd)
    for _ in range(3):
        assert torch.equal(ops.weighted_mse(ad, bd, wd), first)  # no atomics: bitwise repeatable
    expect = (w.double() * ((a.double() - b.double()) ** 2).sum(-1)).sum()
    torch.testing.assert_close(first.cpu().double(), expect, rtol=1e-5, atol=0)


def test_weighted_mse_overflows_to_inf():
    a = torch.full((2, 3, 4), 1e20)
    out = ops.weighted_mse(*cuda(a, -a, torch.ones(3)))
    assert out.dtype == torch.float32 and out.item() == float("inf")


def test_weighted_mse_gradcheck():
    gen = torch.Generator().manual_seed(9)
    a = torch.randn(3, 4, 6, dtype=torch.float64, generator=gen).to(DEV).requires_grad_()
    b = torch.randn(3, 4, 6, dtype=torch.float64, generator=gen).to(DEV).requires_grad_()
    w = torch.rand(4, dtype=torch.float64, generator=gen).to(DEV).requires_grad_()
    assert torch.autograd.gradcheck(ops.weighted_mse, (a, b, w))


def test_weighted_mse_backward_matches_torch():
    gen = torch.Generator().manual_seed(10)
    a = torch.randn(6, 9, generator=gen).to(DEV).requires_grad_()
    b = torch.randn(6, 9, generator=gen).to(DEV).requires_grad_()
    w = torch.rand(6, generator=gen).to(DEV)
    (ops.weighted_mse(a, b, w) * 3.0).backward()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ((w * ((a2 - b2) ** 2).sum(-1)).sum() * 3.0).backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


# ---- opcheck and torch.compile ------------------------------------------------------------------


def _opcheck_cases():
    gen = torch.Generator().manual_seed(12)
    q = rand_codes(5, 10, gen=gen).to(DEV)
    x = torch.randn(2, 3, 64, generator=gen).to(DEV)
    w, s = ops.quantize_int4(torch.randn(9, 64, generator=gen).to(DEV))
    a, sa = ops.quantize_int4(x.reshape(-1, 64))
    bias = torch.randn(9, generator=gen).to(DEV)
    fa = torch.randn(2, 4, 5, generator=gen).to(DEV).requires_grad_()
    fb = torch.randn(2, 4, 5, generator=gen).to(DEV).requires_grad_()
    fw = torch.rand(4, generator=gen).to(DEV)
    return [
        ("pack_int4", (q,)),
        ("unpack_int4", (ops.pack_int4(q),)),
        ("quantize_int4", (x, 0.9)),
        ("w4a4_gemm", (a, sa, w, s, bias, torch.bfloat16)),
        ("w4a4_gemm", (a, sa, w, s, None, torch.int32)),
        ("w4a4_linear", (x, w, s, bias, 1.0)),
        ("w4a4_linear", (x.half(), w, s, None, 0.7)),
        ("weighted_mse", (fa, fb, fw)),
        ("weighted_mse_backward", (torch.tensor(2.0, device=DEV), fa.detach(), fb.detach(), fw)),
    ]


@pytest.mark.parametrize("name,args", [pytest.param(n, a, id=f"{n}-{i}") for i, (n, a) in enumerate(_opcheck_cases())])
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.fair, name).default, args)


def test_w4a4_linear_under_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(15)
    w, s = ops.quantize_int4(torch.randn(48, 128, generator=gen).to(DEV))
    bias = torch.randn(48, generator=gen).to(DEV)

    def layer(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(ops.w4a4_linear(x * 2.0, w, s, bias)) + 1.0

    x = torch.randn(3, 7, 128, generator=gen).to(DEV).half()
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=2**-10, atol=1e-3)
    x2 = torch.randn(5, 128, generator=gen).to(DEV).half()  # new shape: recompiles, still one graph
    torch.testing.assert_close(compiled(x2), layer(x2), rtol=2**-10, atol=1e-3)
