// Small helpers shared by the CPU op drivers (not by the ISA kernel files, which stay torch-free).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <memory>

namespace fair::cpu {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// 64-byte aligned scratch memory (kernels use unaligned loads; alignment is for speed only).
struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
std::unique_ptr<T[], FreeDeleter> aligned_buffer(int64_t n) {
  const size_t bytes = size_t(round_up(std::max<int64_t>(n, 1) * int64_t(sizeof(T)), 64));
  void* p = std::aligned_alloc(64, bytes);
  if (p == nullptr) throw std::bad_alloc();
  return std::unique_ptr<T[], FreeDeleter>(static_cast<T*>(p));
}

// Sign-extends the two nibbles of a packed byte.
inline int8_t lo_nibble(uint8_t b) { return int8_t(uint8_t(b << 4)) >> 4; }
inline int8_t hi_nibble(uint8_t b) { return int8_t(b) >> 4; }

// Row pointer as fp32: fp32 rows are used in place, others converted into `buf` (exactly).
inline const float* row_as_float(const at::Tensor& x, int64_t row, int64_t K, float* buf) {
  switch (x.scalar_type()) {
    case at::kFloat: return x.const_data_ptr<float>() + row * K;
    case at::kBFloat16: {
      const c10::BFloat16* p = x.const_data_ptr<c10::BFloat16>() + row * K;
      for (int64_t k = 0; k < K; ++k) buf[k] = float(p[k]);
      return buf;
    }
    case at::kHalf: {
      const c10::Half* p = x.const_data_ptr<c10::Half>() + row * K;
      for (int64_t k = 0; k < K; ++k) buf[k] = float(p[k]);
      return buf;
    }
    case at::kDouble: {
      const double* p = x.const_data_ptr<double>() + row * K;
      for (int64_t k = 0; k < K; ++k) buf[k] = float(p[k]);
      return buf;
    }
    default: TORCH_CHECK(false, "unsupported dtype ", x.scalar_type());
  }
}

// The row quantizers compute scale = clip * absmax / 7 in fp32 (the contract); with clip > 1 a
// finite row can overflow it to inf, which would give all-zero codes. Called once a row's scale
// came out non-finite, to say so (naming the clip argument `clip_name`).
[[noreturn]] inline void fail_scale_overflow(const char* op, const char* clip_name, double clip,
                                             const at::Tensor& x2d, int64_t row) {
  const double absmax = x2d[row].abs().max().item<double>();
  TORCH_CHECK(false, "fair::", op, ": the int4 scale ", clip_name, " * absmax / 7 of x's row ",
              row, " overflows float32 (", clip_name, "=", clip, ", absmax=", absmax,
              "); use a smaller ", clip_name, " or rescale x");
}

inline void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "fair::", op, ": all tensors must be on the same device; ",
              name, " is on ", t.device(), ", expected cpu");
}

}  // namespace fair::cpu
