// Portable scalar path: the correctness baseline and the only path off x86. Plain loops over the
// same buffers the vector paths use (layout in isa.h).
#include <cmath>
#include <cstring>

#include "cpu/isa.h"

namespace fair::cpu {
namespace {

// u = w + 8 of channel j in [0, 64), k = 4 q + t of a prepacked block (layout in isa.h).
inline int32_t block_u(const uint8_t* B, int64_t q, int j, int t) {
  const uint8_t byte = B[q * kQuadBytes + (j / 32) * 64 + 4 * (j % 16) + t];
  return (j % 32) < 16 ? (byte & 15) : (byte >> 4);
}

void gemm_scalar(const int8_t* A, int64_t lda, int64_t mb, const uint8_t* Bs, int64_t ldb,
                 int64_t nblocks, int64_t kq, int32_t* Cs, int64_t ldc, bool accumulate,
                 uint8_t* /*scratch*/) {
  for (int64_t b = 0; b < nblocks; ++b) {
  const uint8_t* B = Bs + b * ldb;
  int32_t* C = Cs + kBlockN * b;
  for (int64_t i = 0; i < mb; ++i) {
    const int8_t* a = A + i * lda;
    int32_t acc[kBlockN] = {0};
    for (int64_t q = 0; q < kq; ++q) {
      for (int j = 0; j < kBlockN; ++j) {
        for (int t = 0; t < 4; ++t) acc[j] += int32_t(a[4 * q + t]) * block_u(B, q, j, t);
      }
    }
    int32_t* c = C + i * ldc;
    for (int j = 0; j < kBlockN; ++j) c[j] = accumulate ? c[j] + acc[j] : acc[j];
  }
  }
}

bool quantize_row_scalar(const float* x, int64_t K, float clip, int8_t* q, float* scale,
                         int32_t* rowsum) {
  float absmax = 0.0f;
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) {
    finite &= std::isfinite(x[k]);
    absmax = std::fmax(absmax, std::fabs(x[k]));
  }
  if (!finite) return false;
  const float s = row_scale(absmax, clip);
  int32_t sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    // nearbyint under the default rounding mode = round half to even
    float r = std::nearbyint(x[k] / s);
    r = std::fmin(std::fmax(r, -8.0f), 7.0f);
    q[k] = int8_t(r);
    sum += q[k];
  }
  *scale = s;
  *rowsum = sum;
  return true;
}

// The 4 nibbles of a 16-bit public quad (k, k+1 in byte 0; k+2, k+3 in byte 1), one per byte.
inline uint32_t spread_quad(uint32_t x) {
  return (x & 0xF) | ((x & 0xF0) << 4) | ((x & 0xF00) << 8) | ((x & 0xF000) << 12);
}

}  // namespace

void prepack_quads_scalar(const uint8_t* W, int64_t ldw, int64_t N, int64_t K, int64_t c0,
                          int64_t q0, int64_t q1, uint8_t* blk) {
  // the public 16-bit quad (bytes 2q, 2q + 1) of channel n; zero outside [0, N) x [0, K)
  auto quad = [&](int64_t n, int64_t q) -> uint32_t {
    if (n >= N || 4 * q >= K) return 0;
    const uint8_t* r = W + n * ldw + 2 * q;
    return r[0] | (4 * q + 2 < K ? uint32_t(r[1]) << 8 : 0u);
  };
  for (int64_t q = q0; q < q1; ++q) {
    for (int h = 0; h < 2; ++h) {
      for (int j = 0; j < 16; ++j) {
        const uint32_t lo = spread_quad(quad(c0 + 32 * h + j, q));
        const uint32_t hi = spread_quad(quad(c0 + 32 * h + 16 + j, q));
        const uint32_t v = (lo | (hi << 4)) ^ 0x88888888u;  // two's complement -> w + 8
        uint8_t* o = blk + q * kQuadBytes + 64 * h + 4 * j;
        for (int t = 0; t < 4; ++t) o[t] = uint8_t(v >> (8 * t));
      }
    }
  }
}

void prepack_blocks_scalar(const uint8_t* W, int64_t ldw, int64_t N, int64_t K, int64_t n0,
                           int64_t nblocks, uint8_t* out) {
  const int64_t nq = (K + kKAlign - 1) / kKAlign * kKAlign / 4;
  for (int64_t b = 0; b < nblocks; ++b) {
    prepack_quads_scalar(W, ldw, N, K, n0 + kBlockN * b, 0, nq, out + b * nq * kQuadBytes);
  }
}

const KernelTable kScalarKernels = {"scalar",    true, /*mr=*/1, /*tile_m=*/1, gemm_scalar,
                                    quantize_row_scalar,
                                    epilogue_scalar};

}  // namespace fair::cpu
