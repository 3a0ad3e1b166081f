// AMX-INT8 path: TDPBSSD (s8 x s8 -> int32) on 16x64-byte tiles.
//
// B holds plain s8 weights (no offset): a panel's 16 consecutive quads are exactly one B tile
// (16 rows of 16 channels x 4 k, 64 bytes per row). A rows are the A tile rows (64 k each, row
// stride lda). Micro tile: 32 rows x 32 channels = 2 A tiles x 2 B tiles -> 4 C tiles.
// Tile registers: 0-3 C, 4-5 A, 6-7 B. Linux needs the XTILEDATA permission, requested in isa.cpp
// before this path can be selected.
#include "cpu/isa.h"

#if defined(FAIR_HAVE_AMX) && defined(FAIR_HAVE_AVX2)
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

FAIR_AMX void gemm_amx(const int8_t* A, int64_t lda, int64_t mb, const uint8_t* B,
                       int64_t npanels, int64_t kq, int32_t* C, int64_t ldc, bool accumulate) {
  TileConfig cfg = {};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;   // C: 16 rows; A: 16 rows; B: 16 quads
    cfg.colsb[t] = 64;  // C: 16 int32; A: 64 k; B: 16 channels x 4 k
  }
  _tile_loadconfig(&cfg);
  const int64_t c_stride = ldc * int64_t(sizeof(int32_t));
  for (int64_t i = 0; i < mb; i += 32) {
    for (int64_t p = 0; p < npanels; p += 2) {
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
      const uint8_t* b0 = B + p * kq * 64;
      const uint8_t* b1 = b0 + kq * 64;
      const int8_t* a0 = A + i * lda;
      const int8_t* a1 = a0 + 16 * lda;
      for (int64_t kb = 0; kb < kq / 16; ++kb) {
        _tile_loadd(4, a0 + 64 * kb, lda);
        _tile_loadd(5, a1 + 64 * kb, lda);
        _tile_loadd(6, b0 + 1024 * kb, 64);
        _tile_loadd(7, b1 + 1024 * kb, 64);
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
      }
      _tile_stored(0, c, c_stride);
      _tile_stored(1, c + 16, c_stride);
      _tile_stored(2, c + 16 * ldc, c_stride);
      _tile_stored(3, c + 16 * ldc + 16, c_stride);
    }
  }
  _tile_release();
}

}  // namespace

const KernelTable kAmxKernels = {
    "amx", true, /*mr=*/32, /*panel_multiple=*/2, /*weight_offset=*/false, gemm_amx,
    pack_panels_avx2, quantize_row_avx2};

}  // namespace fair::cpu

#else

namespace fair::cpu {
const KernelTable kAmxKernels = {"amx", false, 1, 1, false, nullptr, nullptr, nullptr};
}

#endif
