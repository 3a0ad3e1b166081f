// Portable scalar path: the correctness baseline and the only path off x86. Plain loops over the
// same buffers the vector paths use (layout in isa.h).
#include <cmath>
#include <cstring>

#include "cpu/isa.h"

namespace fair::cpu {
namespace {

void gemm_scalar(const int8_t* A, int64_t lda, int64_t mb, const uint8_t* B, int64_t npanels,
                 int64_t kq, int32_t* C, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < mb; ++i) {
    const int8_t* a = A + i * lda;
    for (int64_t p = 0; p < npanels; ++p) {
      const uint8_t* panel = B + p * kq * 64;
      int32_t acc[16] = {0};
      for (int64_t q = 0; q < kq; ++q) {
        const uint8_t* bq = panel + q * 64;
        for (int j = 0; j < 16; ++j) {
          for (int t = 0; t < 4; ++t) acc[j] += int32_t(a[4 * q + t]) * int32_t(int8_t(bq[4 * j + t]));
        }
      }
      int32_t* c = C + i * ldc + 16 * p;
      for (int j = 0; j < 16; ++j) c[j] = accumulate ? c[j] + acc[j] : acc[j];
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

}  // namespace

// One nibble in the panel encoding: u = n ^ 8 = w + 8 (offset) or the sign-extended w.
static inline uint8_t encode_nibble(unsigned n, bool offset) {
  const unsigned u = (n & 0xF) ^ 8;
  return uint8_t(offset ? u : u - 8);
}

void pack_panels_scalar(const uint8_t* W, int64_t N, int64_t K, int64_t n0, int64_t npanels,
                        int64_t k0, int64_t kq, bool offset, uint8_t* out) {
  const int64_t ldw = K / 2;
  for (int64_t p = 0; p < npanels; ++p) {
    for (int j = 0; j < 16; ++j) {
      const int64_t n = n0 + 16 * p + j;
      uint8_t* o = out + p * kq * 64 + 4 * j;
      for (int64_t q = 0; q < kq; ++q) {
        for (int t = 0; t < 4; t += 2) {
          const int64_t k = k0 + 4 * q + t;  // even: one packed byte holds k and k + 1
          const uint8_t byte = (n < N && k < K) ? W[n * ldw + k / 2] : 0;
          o[q * 64 + t] = encode_nibble(byte, offset);
          o[q * 64 + t + 1] = encode_nibble(byte >> 4, offset);
        }
      }
    }
  }
}

const KernelTable kScalarKernels = {
    "scalar", true, /*mr=*/1, /*panel_multiple=*/1, /*weight_offset=*/false,
    gemm_scalar, pack_panels_scalar, quantize_row_scalar};

}  // namespace fair::cpu
