"""Randomized sweep (fixed seed, >= 1000 cases, tiny shapes) of the W4A4 ops against exact
pure-torch oracles, cycling through every CPU ISA path this machine supports."""

from __future__ import annotations

import pytest
import torch

import fair_calib_ext

if fair_calib_ext._C is None:
    pytest.skip(f"fair_calib_ext._C not built: {fair_calib_ext._C_ERROR}", allow_module_level=True)

from fair_calib_ext import ops  # noqa: E402

SUPPORTED = fair_calib_ext.build_info()["cpu_isa_supported"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems: one thread keeps the torch reference matmuls from stalling in the thread
    pool on a busy machine (the kernels run tiny problems on the calling thread anyway;
    test_ops.py covers the multi-threaded tiling)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _codes(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Random int4 codes; a quarter of the cases use only the extremes -8 / 7."""
    if torch.randint(0, 4, (1,), generator=gen).item() == 0:
        return torch.where(torch.rand(shape, generator=gen) < 0.5, -8, 7).to(torch.int8)
    return torch.randint(-8, 8, shape, dtype=torch.int8, generator=gen)


def test_gemm_sweep_1000_cases():
    gen = torch.Generator().manual_seed(2024)
    cases = 0
    for i in range(1000):
        M = int(torch.randint(1, 40, (1,), generator=gen))
        N = int(torch.randint(1, 70, (1,), generator=gen))
        K = 2 * int(torch.randint(1, 200, (1,), generator=gen))
        qa, qw = _codes((M, K), gen), _codes((N, K), gen)
        with ops.cpu_isa(SUPPORTED[i % len(SUPPORTED)]):
            acc = ops.w4a4_gemm(ops.pack_int4(qa), torch.ones(M), ops.pack_int4(qw), torch.ones(N), None, torch.int32)
        expect = (qa.double() @ qw.double().T).to(torch.int32)
        assert torch.equal(acc, expect), (i, M, N, K, SUPPORTED[i % len(SUPPORTED)])
        cases += 1
    assert cases == 1000


def test_linear_sweep_300_cases():
    """w4a4_linear = reference quantizer + exact acc + the fp32 epilogue, bit for bit."""
    gen = torch.Generator().manual_seed(7)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    for i in range(300):
        M = int(torch.randint(1, 20, (1,), generator=gen))
        N = int(torch.randint(1, 40, (1,), generator=gen))
        K = 2 * int(torch.randint(1, 150, (1,), generator=gen))
        dtype = dtypes[i % 3]
        clip = float(torch.empty(1).uniform_(0.5, 1.0, generator=gen))
        x = (torch.randn(M, K, generator=gen) * 4).to(dtype)
        qw = _codes((N, K), gen)
        ws = torch.rand(N, generator=gen) * 0.1 + 1e-3
        with ops.cpu_isa(SUPPORTED[i % len(SUPPORTED)]):
            out = ops.w4a4_linear(x, ops.pack_int4(qw), ws, None, clip)
        x32 = x.float()
        sa = (clip * x32.abs().amax(-1)) / 7.0
        sa = torch.where(sa == 0, torch.ones_like(sa), sa)
        qa = torch.clamp(torch.round(x32 / sa[:, None]), -8, 7)
        acc = (qa.double() @ qw.double().T).float()
        expect = ((acc * sa[:, None]) * ws[None, :]).to(dtype)
        assert torch.equal(out, expect), (i, M, N, K, dtype, clip)
