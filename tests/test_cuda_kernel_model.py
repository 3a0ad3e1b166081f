"""A CPU model of the W4A4 tensor-core kernel's index math (csrc/cuda/w4a4_gemm.cu).

No GPU runs in CI, so this checks the part of the CUDA GEMM that is easiest to get wrong and
that the compile check cannot see: which bytes each lane moves. The model replays, line by line,
the kernel's cp.async chunk placement (with its XOR swizzle and zero fill), the ldmatrix.x4 row
addresses, the fragment semantics of ``mma.sync m16n8k64 .s4`` and ``m16n8k32 .s8`` as the PTX
ISA defines them, the s4 -> s8 register unpack of the int8 path, and the epilogue's fragment ->
(row, col) map; it then compares the accumulators with the exact integer oracle. The tile
configurations are read from the .cu file, so the model follows the kernel's real tiles.
What it cannot check: timing, the async pipeline's synchronisation, and the hardware itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

SRC = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "w4a4_gemm.cu"


def tile_configs() -> dict[str, tuple[int, ...]]:
    """{name: (BM, BN, BKB, WM, WN, STAGES)} from the `using CfgX = TileConfig<...>` lines."""
    pat = re.compile(r"using (Cfg\w+) = TileConfig<\s*([\d,\s]+)>")
    found = {m.group(1): tuple(int(v) for v in m.group(2).split(",")) for m in pat.finditer(SRC.read_text())}
    assert found, "no TileConfig found in w4a4_gemm.cu"
    return found


def swizzle(cpr: int, r, c):  # noqa: ANN001, ANN201  (ints or int arrays)
    return c ^ ((r // (8 // cpr)) % cpr)


def sext4(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v).astype(np.int64) & 15
    return np.where(v >= 8, v - 16, v)


# A 32-bit register is modelled as its 4 bytes (uint8 [..., 4], byte 0 first).
def nibbles(reg: np.ndarray) -> np.ndarray:
    """[..., 4] bytes -> [..., 8] signed 4-bit values, low nibble of byte 0 first ("low to high")."""
    return np.stack([sext4(reg), sext4(reg >> 4)], -1).reshape(*reg.shape[:-1], 8)


def sbytes(reg: np.ndarray) -> np.ndarray:
    """[..., 4] bytes -> [..., 4] signed bytes."""
    return reg.astype(np.int8).astype(np.int64)


def s4x8_to_s8x8(reg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Model of ptx::s4x8_to_s8x8: lo = s8 bytes of e0..e3, hi = e4..e7."""
    e = nibbles(reg).astype(np.int8).view(np.uint8)
    return e[..., :4], e[..., 4:]


def ldmatrix_x4(smem: np.ndarray, addrs: np.ndarray) -> np.ndarray:
    """regs [32 lanes, 4, 4 bytes]: register i of a lane = bytes 4*(lane%4).. of row lane//4 of
    matrix i, whose 8 row addresses come from lanes 8i..8i+7."""
    lane = np.arange(32)
    regs = np.empty((32, 4, 4), np.uint8)
    for i in range(4):
        rows = smem[addrs[8 * i: 8 * i + 8, None] + np.arange(16)]  # [8, 16]
        regs[:, i] = rows[(lane // 4)[:, None], 4 * (lane % 4)[:, None] + np.arange(4)]
    return regs


def mma(acc: np.ndarray, a: np.ndarray, b: np.ndarray, s4: bool) -> None:
    """acc [32 lanes, 4] += one 16x8 MMA tile; a [32, 4 regs, 4 bytes], b [32, 2, 4] in the PTX
    fragment layouts (g = lane/4, t = lane%4)."""
    kdim, per, split = (64, 8, nibbles) if s4 else (32, 4, sbytes)
    half = kdim // 2
    g, t = np.arange(32) // 4, np.arange(32) % 4
    A = np.zeros((16, kdim), np.int64)
    B = np.zeros((kdim, 8), np.int64)
    av, bv = split(a), split(b)  # [32, 4, per], [32, 2, per]
    a_rows = np.stack([g, g + 8, g, g + 8], 1)
    a_k0 = np.stack([per * t, per * t, half + per * t, half + per * t], 1)
    A[a_rows[..., None], a_k0[..., None] + np.arange(per)] = av
    b_k0 = np.stack([per * t, half + per * t], 1)
    B[b_k0[..., None] + np.arange(per), np.broadcast_to(g[:, None, None], b_k0[..., None].shape)] = bv
    D = A @ B
    acc += np.stack([D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1]], 1)


def run_model(cfg: tuple[int, ...], int8: bool, a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Replays w4a4_gemm_tc_kernel over the whole grid; returns the int32 accumulators [M, N]."""
    BM, BN, BKB, WM, WN, _stages = cfg
    M, Kb = a.shape
    N = w.shape[0]
    CPR, KSTEPS = BKB // 16, BKB // 32
    WTM, WTN = BM // WM, BN // WN
    MT, NT = WTM // 16, WTN // 8
    KT = (Kb + BKB - 1) // BKB
    out = np.full((M, N), -(2**40), np.int64)
    for by in range((M + BM - 1) // BM):
        for bx in range((N + BN - 1) // BN):
            m0, n0 = by * BM, bx * BN
            accs = {(wm, wn): np.zeros((MT, NT, 32, 4), np.int64) for wm in range(WM) for wn in range(WN)}
            for kt in range(KT):
                kb0 = kt * BKB
                sA = np.zeros(BM * BKB, np.uint8)
                sB = np.zeros(BN * BKB, np.uint8)
                for smem, src, rows, base in ((sA, a, BM, m0), (sB, w, BN, n0)):
                    limit = M if src is a else N
                    for i in range(rows * CPR):
                        r, c = i // CPR, i % CPR
                        gk = kb0 + c * 16
                        dst = r * BKB + swizzle(CPR, r, c) * 16
                        if base + r < limit and gk < Kb:
                            smem[dst: dst + 16] = src[base + r, gk: gk + 16]
                        else:
                            smem[dst: dst + 16] = 0
                for (wm, wn), acc in accs.items():
                    for ks in range(KSTEPS):
                        lane = np.arange(32)
                        af = []
                        for mt in range(MT):
                            r = wm * WTM + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8
                            c = 2 * ks + (lane >> 4)
                            af.append(ldmatrix_x4(sA, r * BKB + swizzle(CPR, r, c) * 16))
                        for np_ in range(NT // 2):
                            r = wn * WTN + np_ * 16 + (lane & 7) + (lane >> 4) * 8
                            c = 2 * ks + ((lane >> 3) & 1)
                            bq = ldmatrix_x4(sB, r * BKB + swizzle(CPR, r, c) * 16)
                            for j in range(2):
                                b = bq[:, 2 * j: 2 * j + 2]
                                for mt in range(MT):
                                    if not int8:
                                        mma(acc[mt, 2 * np_ + j], af[mt], b, s4=True)
                                        continue
                                    for h in range(2):
                                        lo0, hi0 = s4x8_to_s8x8(af[mt][:, 2 * h])
                                        lo1, hi1 = s4x8_to_s8x8(af[mt][:, 2 * h + 1])
                                        a8 = np.stack([lo0, lo1, hi0, hi1], 1)
                                        b8 = np.stack(s4x8_to_s8x8(b[:, h]), 1)
                                        mma(acc[mt, 2 * np_ + j], a8, b8, s4=False)
            for (wm, wn), acc in accs.items():
                for mt in range(MT):
                    for h in range(2):
                        for lane in range(32):
                            g, t = lane >> 2, lane & 3
                            row = m0 + wm * WTM + mt * 16 + g + 8 * h
                            if row >= M:
                                continue
                            for nt in range(NT):
                                col = n0 + wn * WTN + nt * 8 + 2 * t
                                for e in range(2):
                                    if col + e < N:
                                        out[row, col + e] = acc[mt, nt, lane, 2 * h + e]
    return out


def oracle(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    qa = np.stack([sext4(a), sext4(a >> 4)], -1).reshape(a.shape[0], -1)
    qw = np.stack([sext4(w), sext4(w >> 4)], -1).reshape(w.shape[0], -1)
    return qa @ qw.T


def test_swizzle_is_a_conflict_free_permutation() -> None:
    for name, (_bm, _bn, bkb, *_rest) in tile_configs().items():
        cpr = bkb // 16
        for r in range(16):
            assert sorted(swizzle(cpr, r, c) for c in range(cpr)) == list(range(cpr)), name
        # One ldmatrix phase: 8 consecutive rows, same logical chunk -> 8 distinct 16-byte bank groups.
        for r0 in (0, 8):
            for c in range(cpr):
                groups = {((r * bkb + swizzle(cpr, r, c) * 16) // 16) % 8 for r in range(r0, r0 + 8)}
                assert len(groups) == 8, (name, r0, c)


def test_s4_to_s8_unpack_model() -> None:
    rng = np.random.default_rng(0)
    vals = rng.integers(-8, 8, (200, 8))
    reg = ((vals[:, 0::2] & 15) | ((vals[:, 1::2] & 15) << 4)).astype(np.uint8)  # packed bytes
    lo, hi = s4x8_to_s8x8(reg)
    np.testing.assert_array_equal(np.concatenate([sbytes(lo), sbytes(hi)], 1), vals)
    # and the integer trick the CUDA helper uses: n | (n & 8) * 0x1E sign-extends each nibble
    n = np.arange(16, dtype=np.int64)
    np.testing.assert_array_equal(((n | (n & 8) * 0x1E) & 255).astype(np.uint8).astype(np.int8), sext4(n))


@pytest.mark.parametrize("int8", [False, True], ids=["int4_mma", "int8_mma"])
@pytest.mark.parametrize("name", sorted(tile_configs()))
def test_kernel_index_math_matches_oracle(name: str, int8: bool) -> None:
    cfg = tile_configs()[name]
    bm, bn, bkb = cfg[:3]
    rng = np.random.default_rng(hash((name, int8)) % 2**32)
    # Partial tiles in M, N and K (K/2 not a multiple of BKB exercises the zero fill).
    M, N, Kb = bm + 3, bn + 5 if bn < 128 else 21, bkb + 16
    a = rng.integers(0, 256, (M, Kb), dtype=np.uint8)
    w = rng.integers(0, 256, (N, Kb), dtype=np.uint8)
    np.testing.assert_array_equal(run_model(cfg, int8, a, w), oracle(a, w))
