"""Tests of the CPU prepacked int4 weight layout (fair::prepack_int4) and the GEMM paths behind
it: layout against a pure-torch reference, w4a4_linear_prepacked bit-identical to w4a4_linear on
every CPU ISA path, odd shapes, M = 1, small-M and multi-threaded problems, exact int32 at the
int4 extremes, bad input, opcheck."""

from __future__ import annotations

import pytest
import torch

import fair_calib_ext

if fair_calib_ext._C is None:
    pytest.skip(f"fair_calib_ext._C not built: {fair_calib_ext._C_ERROR}", allow_module_level=True)

from fair_calib_ext import ops  # noqa: E402
from op_reference import epilogue, exact_acc, isa_params, rand_codes, ref_pack, ref_quantize  # noqa: E402  (tests/)


@pytest.fixture(params=isa_params())
def isa(request):
    with ops.cpu_isa(request.param):
        yield request.param


def ref_prepack(q: torch.Tensor) -> torch.Tensor:
    """The documented layout (csrc/cpu/isa.h): blocks of 64 channels, quads of 4 k, 128 bytes per
    quad; byte [b][q][h][4j + t] = u(64b + 32h + j) | u(64b + 32h + 16 + j) << 4, u = w + 8."""
    n, k = q.shape
    nb, nq = (n + 63) // 64, (k + 63) // 64 * 16
    u = torch.full((nb * 64, nq * 4), 8, dtype=torch.int16)
    u[:n, :k] = q.to(torch.int16) + 8
    u = u.view(nb, 64, nq, 4).permute(0, 2, 1, 3).reshape(nb, nq, 2, 2, 16, 4)  # [b, q, h, s, j, t]
    byte = u[:, :, :, 0] | (u[:, :, :, 1] << 4)
    return byte.reshape(nb, nq, 128).to(torch.uint8)


@pytest.mark.parametrize("N,K", [(1, 2), (5, 30), (64, 64), (100, 130), (128, 2048), (200, 1024 + 66)])
def test_prepack_layout_matches_reference(isa, N, K):
    gen = torch.Generator().manual_seed(N * 7 + K)
    q = rand_codes(N, K, gen=gen)
    p = ops.prepack_int4(ops.pack_int4(q))
    assert p.dtype == torch.uint8 and p.shape == ((N + 63) // 64, (K + 63) // 64 * 16, 128)
    assert torch.equal(p, ref_prepack(q))


def test_prepack_non_contiguous_and_empty():
    gen = torch.Generator().manual_seed(2)
    w = ops.pack_int4(rand_codes(70, 200, gen=gen))
    w_nc = torch.cat([w, w], dim=1)[:, : w.shape[1]]
    assert torch.equal(ops.prepack_int4(w_nc), ops.prepack_int4(w))
    assert ops.prepack_int4(torch.zeros(0, 8, dtype=torch.uint8)).shape == (0, 16, 128)


def test_vector_prepacker_and_gemms_match_scalar():
    assert fair_calib_ext._C._selftest_pack_panels() == ""


# (M, N, K): tile edges of the 6-row / 64-channel micro tile, K not a multiple of 64, several K
# blocks (1024), channel groups, M = 1 and the small-M range
SHAPES = [
    (1, 1, 2),
    (1, 64, 64),
    (1, 130, 4096 + 66),
    (2, 65, 2 * 1024 + 66),
    (5, 63, 126),
    (6, 64, 192),
    (7, 129, 258),
    (13, 31, 1000),
    (16, 300, 1090),
    (17, 257, 64),
    (40, 520, 130),
]


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_prepacked_linear_bitwise_equals_public_and_reference(isa, one_thread, M, N, K):
    gen = torch.Generator().manual_seed(M * 131 + N * 7 + K)
    x = torch.randn(M, K, generator=gen) * 2
    wq, ws = ref_quantize(torch.randn(N, K, generator=gen))
    bias = torch.randn(N, generator=gen)
    wp = ops.prepack_int4(ref_pack(wq))
    qa, sa = ref_quantize(x)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        qa, sa = ref_quantize(xd)
        out = ops.w4a4_linear_prepacked(xd, wp, ws, bias, in_features=K)
        assert out.dtype == dtype and out.shape == (M, N)
        assert torch.equal(out, ops.w4a4_linear(xd, ref_pack(wq), ws, bias))
        assert torch.equal(out, epilogue(exact_acc(qa, wq), sa, ws, bias, dtype))


@pytest.mark.parametrize("M,N,K", [(3, 400, 4096 + 64), (67, 197, 1090), (300, 70, 258)])
def test_int32_exact_multithreaded(isa, M, N, K):
    """>= 2^22 MACs: the GEMM runs on the thread pool (2 threads, dynamic task schedule)."""
    assert M * N * K >= 2**22
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(M + N + K)
        qa, qw = rand_codes(M, K, gen=gen), rand_codes(N, K, gen=gen)
        acc = ops.w4a4_gemm(ops.pack_int4(qa), torch.ones(M), ops.pack_int4(qw), torch.ones(N), None, torch.int32)
        assert torch.equal(acc, exact_acc(qa, qw))
        x = torch.randn(M, K, generator=gen)
        ws = torch.rand(N, generator=gen) + 0.01
        out = ops.w4a4_linear_prepacked(x, ops.prepack_int4(ops.pack_int4(qw)), ws, in_features=K)
        qx, sx = ref_quantize(x)
        assert torch.equal(out, epilogue(exact_acc(qx, qw), sx, ws, None, torch.float32))
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("va,vw", [(-8, -8), (-8, 7), (7, 7), (7, -8)])
@pytest.mark.parametrize("M", [1, 6, 16, 31])
def test_int32_exact_extremes_small_m(isa, one_thread, va, vw, M):
    N, K = 70, 4096 + 64
    qa = torch.full((M, K), va, dtype=torch.int8)
    qw = torch.full((N, K), vw, dtype=torch.int8)
    acc = ops.w4a4_gemm(ops.pack_int4(qa), torch.ones(M), ops.pack_int4(qw), torch.ones(N), None, torch.int32)
    assert torch.equal(acc, torch.full((M, N), va * vw * K, dtype=torch.int32))


SUBPROCESS_CHECK = """
import torch, fair_calib_ext
from fair_calib_ext import ops
from fair_calib_ext.nn import W4A4Linear
torch.set_num_threads(2)
gen = torch.Generator().manual_seed(0)
lin = torch.nn.Linear(1090, 390)
q = W4A4Linear.from_linear(lin)
for m in (1, 16, 67):
    x = torch.randn(m, 1090, generator=gen)
    qa, sa = ref_quantize(x)
    qw = ops.unpack_int4(q.weight_packed)
    acc = (qa.double() @ qw.double().T).to(torch.int32)
    expect = ((acc.float() * sa[:, None]) * q.weight_scale[None, :] + q.bias[None, :])
    assert torch.equal(q(x), expect), m
print("ISA=" + ops.get_cpu_isa())
"""


@pytest.mark.parametrize("name", [p.values[0] for p in isa_params()])
def test_env_forced_isa_prepacked_exact_in_new_process(name, tmp_path):
    """FAIR_CPU_ISA=<path> in a fresh process: W4A4Linear (prepacked, 2 threads) is exact."""
    import inspect
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not ops.cpu_isa_supported(name):
        pytest.skip(f"this CPU/build lacks {name}")
    pkg_parent = str(Path(fair_calib_ext.__file__).resolve().parents[1])
    code = "import torch\n" + inspect.getsource(ref_quantize) + SUBPROCESS_CHECK
    env = dict(os.environ, FAIR_CPU_ISA=name, PYTHONPATH=pkg_parent)
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"ISA={name}" in res.stdout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float_outputs_round_half_even_at_ties(isa, one_thread, dtype):
    """Unit scales make the fp32 result the exact integer accumulator, so many outputs sit exactly
    halfway between two bf16 / fp16 values: every epilogue must round those to even like torch."""
    gen = torch.Generator().manual_seed(21)
    # 70 channels: vector lanes and a column tail; fp16 ties need |acc| > 2048: a longer K
    M, N, K = 40, 70, 1024 if dtype == torch.bfloat16 else 8192
    qa, qw = rand_codes(M, K, gen=gen), rand_codes(N, K, gen=gen)
    acc = exact_acc(qa, qw)
    bits = 8 if dtype == torch.bfloat16 else 11  # significant bits
    mag = acc.abs().double()
    ulp = torch.pow(2.0, torch.floor(torch.log2(mag.clamp(min=1))) - (bits - 1))
    ties = ((mag / ulp) % 1 == 0.5).sum().item()
    assert ties > 20, ties  # the data really exercises the tie rule
    out = ops.w4a4_gemm(ops.pack_int4(qa), torch.ones(M), ops.pack_int4(qw), torch.ones(N), None, dtype)
    assert torch.equal(out, acc.float().to(dtype))


def _pp(n: int, k: int) -> torch.Tensor:
    return ops.prepack_int4(torch.zeros(n, k // 2, dtype=torch.uint8))


@pytest.mark.parametrize(
    "fn,match",
    [
        pytest.param(
            lambda: ops.prepack_int4(torch.zeros(4, 4, dtype=torch.int8)), "w must be uint8", id="prepack dtype"
        ),
        pytest.param(lambda: ops.prepack_int4(torch.zeros(4, dtype=torch.uint8)), "w must be 2-D", id="prepack dim"),
        pytest.param(
            lambda: ops.w4a4_linear_prepacked(torch.zeros(2, 8), torch.zeros(4, 4, dtype=torch.uint8), torch.ones(4),
                                              in_features=8),
            "must be the uint8 output of prepack_int4",
            id="public layout passed",
        ),
        pytest.param(
            lambda: ops.w4a4_linear_prepacked(torch.zeros(2, 128), _pp(4, 64), torch.ones(4), in_features=128),
            "must be the uint8 output of prepack_int4 for N=4",
            id="K mismatch",
        ),
        pytest.param(
            lambda: ops.w4a4_linear_prepacked(torch.zeros(2, 8), _pp(65, 8), torch.ones(4), in_features=8),
            "N=4",
            id="N mismatch",
        ),
        pytest.param(
            lambda: ops.w4a4_linear_prepacked(torch.zeros(2, 7), _pp(4, 8), torch.ones(4), in_features=7),
            "K must be even",
            id="odd K",
        ),
        pytest.param(
            lambda: ops.w4a4_linear_prepacked(torch.zeros(2, 8), _pp(4, 8), torch.ones(4), torch.ones(3), in_features=8),
            r"bias must have shape \[N\] = \[4\]",
            id="bias len",
        ),
        pytest.param(
            lambda: ops.w4a4_linear_prepacked(torch.zeros(2, 8, dtype=torch.int32), _pp(4, 8), torch.ones(4),
                                              in_features=8),
            "x must be float32",
            id="x dtype",
        ),
        pytest.param(
            lambda: ops.w4a4_linear_prepacked(torch.full((2, 8), float("nan")), _pp(4, 8), torch.ones(4), in_features=8),
            "inf or NaN in row 0",
            id="nan",
        ),
        pytest.param(
            lambda: ops.w4a4_linear_prepacked(torch.zeros(2, 8), _pp(4, 8).to("meta"), torch.ones(4), in_features=8),
            "same device",
            id="mixed devices",
        ),
    ],
)
def test_bad_input_raises_named_error(fn, match):
    with pytest.raises(RuntimeError, match=match):
        fn()


@pytest.mark.parametrize("k_x,k_w", [(62, 64), (64, 62), (8, 2)])
def test_prepacked_refuses_an_input_of_another_k_in_the_same_padding(k_x, k_w):
    """The prepacked layout pads K to 64, so the op alone would take x [.., 62] for weights of K=64
    (the missing columns as zeros) and return a result of the right shape: the wrapper refuses it."""
    wp = _pp(4, k_w)
    with pytest.raises(ValueError, match=f"last dimension is {k_x}, expected in_features={k_w}"):
        ops.w4a4_linear_prepacked(torch.randn(3, k_x), wp, torch.ones(4), in_features=k_w)


def test_empty_inputs():
    wp, ws = _pp(5, 8), torch.ones(5)
    assert ops.w4a4_linear_prepacked(torch.zeros(0, 8), wp, ws, in_features=8).shape == (0, 5)
    assert ops.w4a4_linear_prepacked(torch.zeros(3, 0), _pp(5, 0), ws, in_features=0).shape == (3, 5)


def _opcheck_cases():
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 64, generator=gen)
    w, s = ops.quantize_int4(torch.randn(9, 64, generator=gen))
    bias = torch.randn(9, generator=gen)
    wp = ops.prepack_int4(w)
    return [
        ("prepack_int4", (w,)),
        ("w4a4_linear_prepacked", (x, wp, s, bias, 1.0)),
        ("w4a4_linear_prepacked", (x.bfloat16(), wp, s, None, 0.7)),
    ]


@pytest.mark.parametrize("name,args", [pytest.param(n, a, id=f"{n}-{i}") for i, (n, a) in enumerate(_opcheck_cases())])
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.fair, name).default, args)
