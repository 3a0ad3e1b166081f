// AMX-INT8 path: TDPBSUD (s8 activations x u8 weights -> int32) on 16x64-byte tiles.
//
// The prepacked block (isa.h) is unpacked once per call into the thread-local scratch buffer,
// u8 [kq][64][4] holding u = w + 8 (the epilogue subtracts 8 * rowsum(A) as on the VNNI path):
// 16 consecutive quads of 16 channels are one B tile (16 rows of 64 bytes, row stride 256). A
// rows are the A tile rows (64 k each, row stride lda). Micro tile: 32 rows x 32 channels = 2 A
// tiles x 2 B tiles -> 4 C tiles, twice per 64-channel block; rows below a 32-row tile go to the
// VNNI kernel. Not measured and never run: the project's machines so far had no AMX; the path is
// compiled, selected by cpuid and covered by the same tests, which skip it on CPUs without AMX.
// Tile registers: 0-3 C, 4-5 A, 6-7 B. Linux needs the XTILEDATA permission, requested in isa.cpp
// before this path can be selected.
#include "cpu/isa.h"

#if defined(FAIR_HAVE_AMX) && defined(FAIR_HAVE_AVX2) && defined(FAIR_HAVE_AVX512_VNNI)
#include <immintrin.h>

#define FAIR_AMX __attribute__((target("amx-tile,amx-int8,avx512f")))

namespace fair::cpu {
namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

FAIR_AMX void gemm_amx_block(const int8_t* A, int64_t lda, int64_t mb, const uint8_t* B,
                             int64_t kq, int32_t* C, int64_t ldc, bool accumulate,
                             uint8_t* scratch) {
  unpack_block_avx512(B, kq, scratch);
  TileConfig cfg = {};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;   // C: 16 rows; A: 16 rows; B: 16 quads
    cfg.colsb[t] = 64;  // C: 16 int32; A: 64 k; B: 16 channels x 4 k
  }
  _tile_loadconfig(&cfg);
  const int64_t c_stride = ldc * int64_t(sizeof(int32_t));
  for (int64_t i = 0; i < mb; i += 32) {
    for (int64_t p = 0; p < kBlockN / 16; p += 2) {
      int32_t* c = C + i * ldc + 16 * p;
      if (accumulate) {
        _tile_loadd(0, c, c_stride);
        _tile_loadd(1, c + 16, c_stride);
        _tile_loadd(2, c + 16 * ldc, c_stride);
        _tile_loadd(3, c + 16 * ldc + 16, c_stride);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      const uint8_t* b0 = scratch + 64 * p;
      const uint8_t* b1 = b0 + 64;
      const int8_t* a0 = A + i * lda;
      const int8_t* a1 = a0 + 16 * lda;
      for (int64_t kb = 0; kb < kq / 16; ++kb) {
        _tile_loadd(4, a0 + 64 * kb, lda);
        _tile_loadd(5, a1 + 64 * kb, lda);
        _tile_loadd(6, b0 + 4096 * kb, 256);
        _tile_loadd(7, b1 + 4096 * kb, 256);
        _tile_dpbsud(0, 4, 6);
        _tile_dpbsud(1, 4, 7);
        _tile_dpbsud(2, 5, 6);
        _tile_dpbsud(3, 5, 7);
      }
      _tile_stored(0, c, c_stride);
      _tile_stored(1, c + 16, c_stride);
      _tile_stored(2, c + 16 * ldc, c_stride);
      _tile_stored(3, c + 16 * ldc + 16, c_stride);
    }
  }
  _tile_release();
}

// Full 32-row tiles on AMX; the remaining rows (all of them when M < 32, e.g. decoding) on the
// VNNI kernel, which reads the prepacked nibbles directly.
FAIR_AMX void gemm_amx(const int8_t* A, int64_t lda, int64_t mb, const uint8_t* B, int64_t ldb,
                       int64_t nblocks, int64_t kq, int32_t* C, int64_t ldc, bool accumulate,
                       uint8_t* scratch) {
  const int64_t m32 = mb / 32 * 32;
  if (m32 > 0) {
    for (int64_t b = 0; b < nblocks; ++b) {
      gemm_amx_block(A, lda, m32, B + b * ldb, kq, C + kBlockN * b, ldc, accumulate, scratch);
    }
  }
  if (m32 < mb) {
    gemm_avx512_vnni(A + m32 * lda, lda, mb - m32, B, ldb, nblocks, kq, C + m32 * ldc, ldc,
                     accumulate, scratch);
  }
}

}  // namespace

const KernelTable kAmxKernels = {"amx", true, /*mr=*/1, /*tile_m=*/32, gemm_amx, quantize_row_avx2,
                                 epilogue_avx512};

}  // namespace fair::cpu

#else

namespace fair::cpu {
const KernelTable kAmxKernels = {"amx", false, 1, 1, nullptr, nullptr, nullptr};
}

#endif
