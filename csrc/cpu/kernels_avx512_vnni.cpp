// AVX512-VNNI path: vpdpbusd (u8 x s8, 4 products summed into each int32 lane) with the
// unsigned-offset trick, exactly the AVX2 structure with zmm registers and no int16 stage.
//
// B holds u = w + 8 in [0, 15] (the unsigned operand), A holds s8 activations; the driver
// subtracts 8 * rowsum(A). Micro tile: 8 rows x 32 channels (two panels, one zmm of 16 lanes x
// 4 k each); per quad two weight loads, 8 broadcasts and 16 vpdpbusd into 16 int32 accumulators.
#include "cpu/isa.h"

#if defined(FAIR_HAVE_AVX512_VNNI) && defined(FAIR_HAVE_AVX2)
#include <immintrin.h>

#include <cstring>

#define FAIR_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

namespace fair::cpu {
namespace {

constexpr int kMr = 8;

FAIR_VNNI inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

FAIR_VNNI void micro_8x32(const int8_t* A, int64_t lda, const uint8_t* B0, const uint8_t* B1,
                          int64_t kq, int32_t* C, int64_t ldc, bool accumulate) {
  __m512i c[kMr][2];
  for (int i = 0; i < kMr; ++i) {
    for (int h = 0; h < 2; ++h) {
      c[i][h] = accumulate ? _mm512_loadu_si512((const void*)(C + i * ldc + 16 * h))
                           : _mm512_setzero_si512();
    }
  }
  for (int64_t q = 0; q < kq; ++q) {
    const __m512i w0 = _mm512_loadu_si512((const void*)(B0 + q * 64));
    const __m512i w1 = _mm512_loadu_si512((const void*)(B1 + q * 64));
    const int8_t* a = A + 4 * q;
    for (int i = 0; i < kMr; ++i) {
      const __m512i av = bcast4(a + i * lda);
      // first source unsigned (weights), second signed (activations)
      c[i][0] = _mm512_dpbusd_epi32(c[i][0], w0, av);
      c[i][1] = _mm512_dpbusd_epi32(c[i][1], w1, av);
    }
  }
  for (int i = 0; i < kMr; ++i) {
    for (int h = 0; h < 2; ++h) _mm512_storeu_si512((void*)(C + i * ldc + 16 * h), c[i][h]);
  }
}

FAIR_VNNI void gemm_avx512_vnni(const int8_t* A, int64_t lda, int64_t mb, const uint8_t* B,
                                int64_t npanels, int64_t kq, int32_t* C, int64_t ldc,
                                bool accumulate) {
  for (int64_t i = 0; i < mb; i += kMr) {
    for (int64_t p = 0; p < npanels; p += 2) {
      const uint8_t* b0 = B + p * kq * 64;
      micro_8x32(A + i * lda, lda, b0, b0 + kq * 64, kq, C + i * ldc + 16 * p, ldc, accumulate);
    }
  }
}

}  // namespace

const KernelTable kAvx512VnniKernels = {
    "avx512_vnni", true, kMr, /*panel_multiple=*/2, /*weight_offset=*/true, gemm_avx512_vnni,
    pack_panels_avx2, quantize_row_avx2};

}  // namespace fair::cpu

#else

namespace fair::cpu {
const KernelTable kAvx512VnniKernels = {"avx512_vnni", false, 1, 1, true, nullptr, nullptr, nullptr};
}

#endif
