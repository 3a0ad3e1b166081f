// AVX2 path: vpmaddubsw (u8 x s8 -> pairs summed into int16) with the unsigned-offset trick.
//
// B holds u = w + 8 in [0, 15] (unsigned operand), A holds s8 activations in [-8, 7]; the driver
// subtracts 8 * rowsum(A). One vpmaddubsw lane (int16) = u0*a0 + u1*a1 in [-240, 210], so 128
// quads (each adds one such pair per int16 lane) stay within [-30720, 26880]: we accumulate 128
// quads in int16, then widen with vpmaddwd(·, 1) into the int32 C tile. No saturation can occur.
//
// The prepacked int4 block (isa.h) is unpacked once per call into the thread-local scratch
// buffer (four contiguous 16-channel panels); micro tile: kMr rows x 16 channels (two ymm of
// 8 lanes x 4 k); per quad two weight loads, kMr 4-byte broadcasts of A and 2*kMr vpmaddubsw
// + vpaddw.
#include "cpu/isa.h"

#if defined(FAIR_HAVE_AVX2)
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#define FAIR_AVX2 __attribute__((target("avx2,fma")))
#define FAIR_AVX2_F16C __attribute__((target("avx2,fma,f16c")))

namespace fair::cpu {
namespace {

constexpr int kMr = 4;  // rows per micro tile (the loop body below is written out for 4)
constexpr int64_t kFlushQuads = 128;  // int16 accumulation bound, see the header comment

FAIR_AVX2 inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// The int32 tile lives in C (memory) and is touched once per 128 quads, so that only the
// 2 * kMr int16 accumulators, two weight vectors and one broadcast occupy registers in the loop.
// c += maddubs(w, a) in int16. The add is written as asm with an in/out operand: it keeps each
// accumulator in one register (gcc 12 otherwise copies every accumulator once per iteration).
FAIR_AVX2 inline void madd16(__m256i& c, __m256i w, __m256i a) {
  const __m256i p = _mm256_maddubs_epi16(w, a);
  __asm__("vpaddw %1, %0, %0" : "+x"(c) : "x"(p));
}

// B: 16 channels x 4 k per quad, quads ldb bytes apart.
FAIR_AVX2 void micro_kx16(const int8_t* A, int64_t lda, const uint8_t* B, int64_t ldb, int64_t kq,
                          int32_t* C, int64_t ldc, bool accumulate) {
  const __m256i ones = _mm256_set1_epi16(1);
  if (!accumulate) {
    for (int i = 0; i < kMr; ++i) {
      _mm256_storeu_si256((__m256i*)(C + i * ldc), _mm256_setzero_si256());
      _mm256_storeu_si256((__m256i*)(C + i * ldc + 8), _mm256_setzero_si256());
    }
  }
  for (int64_t q0 = 0; q0 < kq; q0 += kFlushQuads) {
    const int64_t n = std::min(kq - q0, kFlushQuads);
    // Named accumulators (not an array): gcc otherwise inserts register copies and spills.
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
            c30 = c00, c31 = c00;
    const uint8_t* b = B + q0 * ldb;
    const int8_t* a = A + 4 * q0;
    for (int64_t q = 0; q < n; ++q, b += ldb, a += 4) {
      const __m256i w0 = _mm256_loadu_si256((const __m256i*)b);
      const __m256i w1 = _mm256_loadu_si256((const __m256i*)(b + 32));
      __m256i av = bcast4(a);
      madd16(c00, w0, av);
      madd16(c01, w1, av);
      av = bcast4(a + lda);
      madd16(c10, w0, av);
      madd16(c11, w1, av);
      av = bcast4(a + 2 * lda);
      madd16(c20, w0, av);
      madd16(c21, w1, av);
      av = bcast4(a + 3 * lda);
      madd16(c30, w0, av);
      madd16(c31, w1, av);
    }
    const __m256i c16[kMr][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
    for (int i = 0; i < kMr; ++i) {
      for (int h = 0; h < 2; ++h) {
        __m256i* c = (__m256i*)(C + i * ldc + 8 * h);
        _mm256_storeu_si256(c, _mm256_add_epi32(_mm256_loadu_si256(c),
                                                _mm256_madd_epi16(c16[i][h], ones)));
      }
    }
  }
}

// Prepacked block (kq quads of 128 nibble bytes) -> four 16-channel panels, u8 [4][kq][16][4]
// (u = w + 8): each panel contiguous, so the micro-kernel streams it sequentially.
FAIR_AVX2 void unpack_block_avx2(const uint8_t* B, int64_t kq, uint8_t* out) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int64_t q = 0; q < kq; ++q) {
    for (int h = 0; h < 2; ++h) {
      for (int s = 0; s < 2; ++s) {
        const uint8_t* src = B + q * kQuadBytes + 64 * h + 32 * s;
        const __m256i x = _mm256_loadu_si256((const __m256i*)src);
        uint8_t* o = out + (2 * h) * kq * 64 + q * 64 + 32 * s;  // panel 2h: low nibbles
        _mm256_storeu_si256((__m256i*)o, _mm256_and_si256(x, m4));
        _mm256_storeu_si256((__m256i*)(o + kq * 64),  // panel 2h + 1: high nibbles
                            _mm256_and_si256(_mm256_srli_epi16(x, 4), m4));
      }
    }
  }
}

FAIR_AVX2 void gemm_avx2(const int8_t* A, int64_t lda, int64_t mb, const uint8_t* B, int64_t ldb,
                         int64_t nblocks, int64_t kq, int32_t* C, int64_t ldc, bool accumulate,
                         uint8_t* scratch) {
  for (int64_t b = 0; b < nblocks; ++b) {
    unpack_block_avx2(B + b * ldb, kq, scratch);
    for (int64_t i = 0; i < mb; i += kMr) {
      for (int64_t p = 0; p < kBlockN / 16; ++p) {
        micro_kx16(A + i * lda, lda, scratch + p * kq * 64, 64, kq,
                   C + i * ldc + kBlockN * b + 16 * p, ldc, accumulate);
      }
    }
  }
}

}  // namespace

// 8 x 8 dword transpose: r[j] dword q -> o[q] dword j.
FAIR_AVX2 static inline void transpose8(const __m256i r[8], __m256i o[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    o[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
    o[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
  }
}

// 8 public 16-bit quads of one channel (16 bytes) -> 8 dwords, dword q = its 4 nibbles, one in
// the low half of each byte.
FAIR_AVX2 static inline __m256i spread8(const uint8_t* p) {
  const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  const __m256i hi_byte = _mm256_and_si256(x, _mm256_set1_epi32(0xFF00));
  const __m256i y = _mm256_or_si256(_mm256_and_si256(x, _mm256_set1_epi32(0xFF)),
                                    _mm256_slli_epi32(hi_byte, 8));
  return _mm256_or_si256(_mm256_and_si256(y, _mm256_set1_epi32(0x000F000F)),
                         _mm256_and_si256(_mm256_slli_epi32(y, 4), _mm256_set1_epi32(0x0F000F00)));
}

// Same bytes as prepack_blocks_scalar: full blocks in groups of 8 quads (32 k) through two
// 8 x 8 dword transposes per half; edge blocks and the k tail through the scalar code.
FAIR_AVX2 void prepack_blocks_avx2(const uint8_t* W, int64_t ldw, int64_t N, int64_t K, int64_t n0,
                                   int64_t nblocks, uint8_t* out) {
  const int64_t nq = (K + kKAlign - 1) / kKAlign * kKAlign / 4;
  const int64_t q_vec = K / 32 * 8;  // quads in full 8-quad groups (32 k) inside K
  const __m256i x88 = _mm256_set1_epi32(int32_t(0x88888888u));
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t c0 = n0 + kBlockN * b;
    uint8_t* blk = out + b * nq * kQuadBytes;
    if (c0 + kBlockN > N) {
      prepack_quads_scalar(W, ldw, N, K, c0, 0, nq, blk);
      continue;
    }
    for (int64_t g = 0; g < q_vec; g += 8) {
      for (int h = 0; h < 2; ++h) {
        for (int jg = 0; jg < 16; jg += 8) {
          __m256i r[8], o[8];
          for (int j = 0; j < 8; ++j) {
            const __m256i lo = spread8(W + (c0 + 32 * h + jg + j) * ldw + 2 * g);
            const __m256i hi = spread8(W + (c0 + 32 * h + 16 + jg + j) * ldw + 2 * g);
            r[j] = _mm256_xor_si256(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), x88);
          }
          transpose8(r, o);
          for (int q = 0; q < 8; ++q) {
            _mm256_storeu_si256((__m256i*)(blk + (g + q) * kQuadBytes + 64 * h + 4 * jg), o[q]);
          }
        }
      }
    }
    if (q_vec < nq) prepack_quads_scalar(W, ldw, N, K, c0, q_vec, nq, blk);
  }
}

// Same arithmetic as epilogue_scalar, 8 lanes at a time (see epilogue_avx512): acc = C - 8 rowsum,
// ((float)acc * a_scale) * w_scale (+ bias) as separate IEEE fp32 operations, then round to
// nearest even (bf16 by integer rounding like c10::BFloat16, NaN -> 0x7FC0; fp16 by vcvtps2ph).
// Column tails go through the scalar epilogue.
FAIR_AVX2_F16C void epilogue_avx2(const int32_t* C, int64_t ldc, int64_t rows, int64_t cols,
                                  const int32_t* rowsum, const float* a_scale,
                                  const float* w_scale, const float* bias, void* out, int64_t ldo,
                                  OutKind kind) {
  const int64_t cv = cols / 8 * 8;
  for (int64_t i = 0; i < rows; ++i) {
    const __m256i corr = _mm256_set1_epi32(8 * rowsum[i]);
    const __m256 sa = _mm256_set1_ps(kind == OutKind::kI32 ? 0.0f : a_scale[i]);
    const int32_t* c = C + i * ldc;
    for (int64_t j = 0; j < cv; j += 8) {
      const __m256i acc = _mm256_sub_epi32(_mm256_loadu_si256((const __m256i*)(c + j)), corr);
      if (kind == OutKind::kI32) {
        _mm256_storeu_si256((__m256i*)(static_cast<int32_t*>(out) + i * ldo + j), acc);
        continue;
      }
      __m256 f = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc), sa),
                               _mm256_loadu_ps(w_scale + j));
      if (bias != nullptr) f = _mm256_add_ps(f, _mm256_loadu_ps(bias + j));
      if (kind == OutKind::kF32) {
        _mm256_storeu_ps(static_cast<float*>(out) + i * ldo + j, f);
        continue;
      }
      __m128i h;
      if (kind == OutKind::kBF16) {
        const __m256i bits = _mm256_castps_si256(f);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
        __m256i r = _mm256_srli_epi32(
            _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
        const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
        r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
        // 8 dwords < 2^16 -> 8 words (packus per 128-bit lane, then the two lanes' low halves)
        const __m256i p = _mm256_packus_epi32(r, r);
        h = _mm_unpacklo_epi64(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
      } else {
        h = _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      }
      _mm_storeu_si128((__m128i*)(static_cast<uint16_t*>(out) + i * ldo + j), h);
    }
  }
  if (cv < cols) {
    const size_t esize = kind == OutKind::kF32 || kind == OutKind::kI32 ? 4 : 2;
    epilogue_scalar(C + cv, ldc, rows, cols - cv, rowsum, a_scale, w_scale + cv,
                    bias != nullptr ? bias + cv : nullptr, static_cast<char*>(out) + cv * esize,
                    ldo, kind);
  }
}

// clamp(round_half_even(x / s), -8, 7) for 8 floats, as int32.
FAIR_AVX2 static inline __m256i code8(const float* p, __m256 vs, __m256 lo, __m256 hi) {
  const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(p), vs),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
}

// Same arithmetic as quantize_row_scalar: |x| max, s = row_scale, q = clamp(rne(x / s)).
FAIR_AVX2 bool quantize_row_avx2(const float* x, int64_t K, float clip, int8_t* q, float* scale,
                                 int32_t* rowsum) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 inf = _mm256_set1_ps(INFINITY);
  __m256 vmax = _mm256_setzero_ps();
  __m256 bad = _mm256_setzero_ps();  // lanes that saw |x| >= inf or NaN
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_and_ps(_mm256_loadu_ps(x + k), abs_mask);
    vmax = _mm256_max_ps(vmax, v);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, inf, _CMP_NLT_UQ));
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, vmax);
  float absmax = 0.0f;
  for (float l : lanes) absmax = std::fmax(absmax, l);
  bool finite = _mm256_movemask_ps(bad) == 0;
  for (; k < K; ++k) {
    finite &= std::isfinite(x[k]);
    absmax = std::fmax(absmax, std::fabs(x[k]));
  }
  if (!finite) return false;

  const float s = row_scale(absmax, clip);
  const __m256 vs = _mm256_set1_ps(s);
  const __m256 lo = _mm256_set1_ps(-8.0f), hi = _mm256_set1_ps(7.0f);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i vsum = _mm256_setzero_si256();
  k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m256i i0 = code8(x + k, vs, lo, hi), i1 = code8(x + k + 8, vs, lo, hi),
                  i2 = code8(x + k + 16, vs, lo, hi), i3 = code8(x + k + 24, vs, lo, hi);
    vsum = _mm256_add_epi32(vsum, _mm256_add_epi32(_mm256_add_epi32(i0, i1),
                                                   _mm256_add_epi32(i2, i3)));
    // packs work per 128-bit lane; the dword permute restores k order.
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    _mm256_storeu_si256((__m256i*)(q + k), _mm256_permutevar8x32_epi32(b, perm));
  }
  int32_t sums[8];
  _mm256_storeu_si256((__m256i*)sums, vsum);
  int32_t sum = 0;
  for (int32_t v : sums) sum += v;
  for (; k < K; ++k) {
    float r = std::nearbyint(x[k] / s);
    r = std::fmin(std::fmax(r, -8.0f), 7.0f);
    q[k] = int8_t(r);
    sum += q[k];
  }
  *scale = s;
  *rowsum = sum;
  return true;
}

const KernelTable kAvx2Kernels = {"avx2", true, kMr, kMr, gemm_avx2, quantize_row_avx2,
                                  epilogue_avx2};

}  // namespace fair::cpu

#else  // !FAIR_HAVE_AVX2

namespace fair::cpu {
const KernelTable kAvx2Kernels = {"avx2", false, 1, 1, nullptr, nullptr, nullptr};
}

#endif
