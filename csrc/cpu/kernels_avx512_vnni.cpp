// AVX512-VNNI path: vpdpbusd (u8 x s8, 4 products summed into each int32 lane) with the
// unsigned-offset trick, reading the prepacked int4 weights directly (layout in isa.h).
//
// Weights are the unsigned operand u = w + 8 in [0, 15]; A holds s8 activations; the epilogue
// subtracts 8 * rowsum(A). Micro tile: R <= 6 rows x 64 channels = 4R zmm accumulators. Per quad
// (4 k) it loads 128 bytes of nibbles (two zmm), unpacks them in registers into four zmm of
// weights (and, shift+and), broadcasts R 4-byte activation groups and issues 4R vpdpbusd: for
// R = 6, 24 vpdpbusd per 8 loads, the weights read once from memory as int4 and never written
// back unpacked (about 92% of the vpdpbusd peak on a Zen-class core, see BENCHMARKS.md). The
// gemm walks the rows in R-row tiles, each sweeping the task's blocks over one K block: the
// tile's activations stay in L1, the nibbles come from L1/L2. Small M (1-5 rows) is the same
// loop with fewer accumulators, streaming the int4 weights once.
//
// Also here, shared with the AMX table: the AVX-512 epilogue (exact offset correction, fp32
// scaling, RNE casts), the prepacker (public layout -> blocks via a 16 x 16 dword transpose),
// the block unpacker and this gemm (AMX's rows below a 32-row tile).
#include "cpu/isa.h"

#if defined(FAIR_HAVE_AVX512_VNNI) && defined(FAIR_HAVE_AVX2)
#include <immintrin.h>

#include <cstring>

// gcc 12 warns about its own _mm512_set1_* / mask intrinsics under -Wall
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define FAIR_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

namespace fair::cpu {
namespace {

constexpr int kMr = 6;

FAIR_VNNI inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// c += dot4(u8 w, s8 a) per int32 lane, in place. Written as asm with an in/out operand: with the
// intrinsic, gcc 12 copies every accumulator of the array once per use and spills them.
FAIR_VNNI inline void dpbusd(__m512i& c, __m512i w, __m512i a) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(c) : "v"(w), "v"(a));
}

// Accumulators are named variables (c<row><vec>), not an array: gcc keeps an array that asm
// operands refer to in memory.
#define FAIR_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define FAIR_LOAD_ROW(i)                                                                   \
  __m512i c##i##0 = _mm512_setzero_si512(), c##i##1 = c##i##0, c##i##2 = c##i##0,         \
          c##i##3 = c##i##0;                                                               \
  if (R > i && accumulate) {                                                               \
    c##i##0 = _mm512_loadu_si512((const void*)(C + i * ldc));                              \
    c##i##1 = _mm512_loadu_si512((const void*)(C + i * ldc + 16));                         \
    c##i##2 = _mm512_loadu_si512((const void*)(C + i * ldc + 32));                         \
    c##i##3 = _mm512_loadu_si512((const void*)(C + i * ldc + 48));                         \
  }
#define FAIR_FMA_ROW(i)                                 \
  if (R > i) {                                          \
    const __m512i av = bcast4(a + i * lda);             \
    dpbusd(c##i##0, w0, av);                            \
    dpbusd(c##i##1, w1, av);                            \
    dpbusd(c##i##2, w2, av);                            \
    dpbusd(c##i##3, w3, av);                            \
  }
#define FAIR_STORE_ROW(i)                                             \
  if (R > i) {                                                        \
    _mm512_storeu_si512((void*)(C + i * ldc), c##i##0);               \
    _mm512_storeu_si512((void*)(C + i * ldc + 16), c##i##1);          \
    _mm512_storeu_si512((void*)(C + i * ldc + 32), c##i##2);          \
    _mm512_storeu_si512((void*)(C + i * ldc + 48), c##i##3);          \
  }

template <int R>
FAIR_VNNI void micro(const int8_t* A, int64_t lda, const uint8_t* B, int64_t kq, int32_t* C,
                     int64_t ldc, bool accumulate) {
  static_assert(R >= 1 && R <= 6, "micro tile rows");
  FAIR_ROWS(FAIR_LOAD_ROW)
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const int8_t* a = A;
  const uint8_t* b = B;
  for (int64_t q = 0; q < kq; ++q, a += 4, b += kQuadBytes) {
    _mm_prefetch((const char*)(b + 8 * kQuadBytes), _MM_HINT_T0);
    _mm_prefetch((const char*)(b + 8 * kQuadBytes + 64), _MM_HINT_T0);
    const __m512i x0 = _mm512_loadu_si512((const void*)b);
    const __m512i x1 = _mm512_loadu_si512((const void*)(b + 64));
    const __m512i w0 = _mm512_and_si512(x0, m4);
    const __m512i w1 = _mm512_and_si512(_mm512_srli_epi16(x0, 4), m4);
    const __m512i w2 = _mm512_and_si512(x1, m4);
    const __m512i w3 = _mm512_and_si512(_mm512_srli_epi16(x1, 4), m4);
    FAIR_ROWS(FAIR_FMA_ROW)
  }
  FAIR_ROWS(FAIR_STORE_ROW)
}

// 16 x 16 dword transpose: r[j] dword q -> r[q] dword j.
FAIR_VNNI inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // u[g + c]: rows g..g+3, column 4 L + c in lane L
    u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);
    t[8 + c] = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xdd);
    r[4 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0xdd);
  }
}

// 16 public 16-bit quads of one channel (32 bytes) -> 16 dwords, dword q = its 4 nibbles, one in
// the low half of each byte.
FAIR_VNNI inline __m512i spread16(const uint8_t* p) {
  const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  const __m512i hi_byte = _mm512_and_si512(x, _mm512_set1_epi32(0xFF00));
  const __m512i y = _mm512_or_si512(_mm512_and_si512(x, _mm512_set1_epi32(0xFF)),
                                    _mm512_slli_epi32(hi_byte, 8));
  return _mm512_or_si512(_mm512_and_si512(y, _mm512_set1_epi32(0x000F000F)),
                         _mm512_and_si512(_mm512_slli_epi32(y, 4), _mm512_set1_epi32(0x0F000F00)));
}

}  // namespace

// Row tiles outermost: one tile's activations (R x 4kq bytes) stay in L1 while it sweeps the
// blocks, whose nibbles come from L2.
FAIR_VNNI void gemm_avx512_vnni(const int8_t* A, int64_t lda, int64_t mb, const uint8_t* B,
                                int64_t ldb, int64_t nblocks, int64_t kq, int32_t* C, int64_t ldc,
                                bool accumulate, uint8_t* /*scratch*/) {
  int64_t i = 0;
  for (; i + kMr <= mb; i += kMr) {
    for (int64_t b = 0; b < nblocks; ++b) {
      micro<kMr>(A + i * lda, lda, B + b * ldb, kq, C + i * ldc + kBlockN * b, ldc, accumulate);
    }
  }
  if (i == mb) return;
  for (int64_t b = 0; b < nblocks; ++b) {
    const int8_t* a = A + i * lda;
    const uint8_t* bb = B + b * ldb;
    int32_t* c = C + i * ldc + kBlockN * b;
    switch (mb - i) {
      case 5: micro<5>(a, lda, bb, kq, c, ldc, accumulate); break;
      case 4: micro<4>(a, lda, bb, kq, c, ldc, accumulate); break;
      case 3: micro<3>(a, lda, bb, kq, c, ldc, accumulate); break;
      case 2: micro<2>(a, lda, bb, kq, c, ldc, accumulate); break;
      default: micro<1>(a, lda, bb, kq, c, ldc, accumulate); break;
    }
  }
}

FAIR_VNNI void prepack_blocks_avx512(const uint8_t* W, int64_t ldw, int64_t N, int64_t K,
                                     int64_t n0, int64_t nblocks, uint8_t* out) {
  const int64_t nq = (K + kKAlign - 1) / kKAlign * kKAlign / 4;
  const int64_t q_vec = K / 64 * 16;  // quads in full 16-quad groups (64 k) inside K
  const __m512i x88 = _mm512_set1_epi32(int32_t(0x88888888u));
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t c0 = n0 + kBlockN * b;
    uint8_t* blk = out + b * nq * kQuadBytes;
    if (c0 + kBlockN > N) {
      prepack_quads_scalar(W, ldw, N, K, c0, 0, nq, blk);
      continue;
    }
    for (int64_t g = 0; g < q_vec; g += 16) {
      for (int h = 0; h < 2; ++h) {
        __m512i r[16];
        for (int j = 0; j < 16; ++j) {
          const __m512i lo = spread16(W + (c0 + 32 * h + j) * ldw + 2 * g);
          const __m512i hi = spread16(W + (c0 + 32 * h + 16 + j) * ldw + 2 * g);
          r[j] = _mm512_xor_si512(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 4)), x88);
        }
        transpose16(r);
        for (int q = 0; q < 16; ++q) {
          _mm512_storeu_si512((void*)(blk + (g + q) * kQuadBytes + 64 * h), r[q]);
        }
      }
    }
    if (q_vec < nq) prepack_quads_scalar(W, ldw, N, K, c0, q_vec, nq, blk);
  }
}

FAIR_VNNI void unpack_block_avx512(const uint8_t* B, int64_t kq, uint8_t* out) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  for (int64_t q = 0; q < kq; ++q) {
    const __m512i x0 = _mm512_loadu_si512((const void*)(B + q * kQuadBytes));
    const __m512i x1 = _mm512_loadu_si512((const void*)(B + q * kQuadBytes + 64));
    uint8_t* o = out + q * 256;
    _mm512_storeu_si512((void*)o, _mm512_and_si512(x0, m4));
    _mm512_storeu_si512((void*)(o + 64), _mm512_and_si512(_mm512_srli_epi16(x0, 4), m4));
    _mm512_storeu_si512((void*)(o + 128), _mm512_and_si512(x1, m4));
    _mm512_storeu_si512((void*)(o + 192), _mm512_and_si512(_mm512_srli_epi16(x1, 4), m4));
  }
}

// Same arithmetic as epilogue_scalar: acc = C - 8 rowsum, ((float)acc * a_scale) * w_scale
// (+ bias) as separate IEEE fp32 operations, then round to nearest even (bf16 by integer
// rounding like c10::BFloat16, NaN -> 0x7FC0; fp16 by vcvtps2ph).
FAIR_VNNI void epilogue_avx512(const int32_t* C, int64_t ldc, int64_t rows, int64_t cols,
                               const int32_t* rowsum, const float* a_scale, const float* w_scale,
                               const float* bias, void* out, int64_t ldo, OutKind kind) {
  for (int64_t i = 0; i < rows; ++i) {
    const __m512i corr = _mm512_set1_epi32(8 * rowsum[i]);
    const __m512 sa = _mm512_set1_ps(kind == OutKind::kI32 ? 0.0f : a_scale[i]);
    const int32_t* c = C + i * ldc;
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 m = cols - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (cols - j)) - 1);
      const __m512i acc = _mm512_sub_epi32(_mm512_maskz_loadu_epi32(m, c + j), corr);
      if (kind == OutKind::kI32) {
        _mm512_mask_storeu_epi32(static_cast<int32_t*>(out) + i * ldo + j, m, acc);
        continue;
      }
      __m512 f = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), sa),
                               _mm512_maskz_loadu_ps(m, w_scale + j));
      if (bias != nullptr) f = _mm512_add_ps(f, _mm512_maskz_loadu_ps(m, bias + j));
      if (kind == OutKind::kF32) {
        _mm512_mask_storeu_ps(static_cast<float*>(out) + i * ldo + j, m, f);
      } else if (kind == OutKind::kBF16) {
        const __m512i bits = _mm512_castps_si512(f);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(
            _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
        r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q),
                                  _mm512_set1_epi32(0x7FC0));
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + i * ldo + j, m,
                                 _mm512_cvtepi32_epi16(r));
      } else {
        const __m256i h = _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + i * ldo + j, m, h);
      }
    }
  }
}

const KernelTable kAvx512VnniKernels = {"avx512_vnni",    true, /*mr=*/1, /*tile_m=*/kMr,
                                        gemm_avx512_vnni,
                                        quantize_row_avx2, epilogue_avx512};

}  // namespace fair::cpu

#else

namespace fair::cpu {
const KernelTable kAvx512VnniKernels = {"avx512_vnni", false, 1, 1, nullptr, nullptr, nullptr};
}

#endif
