// CPU ops pack_int4, unpack_int4, quantize_int4.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <atomic>
#include <cmath>

#include "cpu/common.h"
#include "cpu/isa.h"
#include "ops.h"

namespace fair {
using namespace fair::cpu;

at::Tensor pack_int4_cpu(const at::Tensor& q_in) {
  check_cpu("pack_int4", "q", q_in);
  TORCH_CHECK(q_in.dim() >= 1, "fair::pack_int4: q must have at least one dimension");
  TORCH_CHECK(q_in.scalar_type() == at::kChar, "fair::pack_int4: q must be int8, got ",
              q_in.scalar_type());
  const int64_t K = q_in.size(-1);
  TORCH_CHECK(K % 2 == 0, "fair::pack_int4: q's last dimension K must be even, got K=", K);
  const at::Tensor q = q_in.contiguous();
  std::vector<int64_t> sizes = q.sizes().vec();
  sizes.back() = K / 2;
  at::Tensor out = at::empty(sizes, q.options().dtype(at::kByte));
  const int8_t* src = q.const_data_ptr<int8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  std::atomic<bool> out_of_range{false};
  at::parallel_for(0, out.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    bool bad = false;
    for (int64_t i = begin; i < end; ++i) {
      const int8_t lo = src[2 * i], hi = src[2 * i + 1];
      bad |= lo < -8 || lo > 7 || hi < -8 || hi > 7;
      dst[i] = uint8_t((lo & 0xF) | ((hi & 0xF) << 4));
    }
    if (bad) out_of_range = true;
  });
  TORCH_CHECK(!out_of_range, "fair::pack_int4: q values must lie in [-8, 7]");
  return out;
}

at::Tensor unpack_int4_cpu(const at::Tensor& p_in) {
  check_cpu("unpack_int4", "packed", p_in);
  TORCH_CHECK(p_in.dim() >= 1, "fair::unpack_int4: packed must have at least one dimension");
  TORCH_CHECK(p_in.scalar_type() == at::kByte, "fair::unpack_int4: packed must be uint8, got ",
              p_in.scalar_type());
  const at::Tensor p = p_in.contiguous();
  std::vector<int64_t> sizes = p.sizes().vec();
  sizes.back() *= 2;
  at::Tensor out = at::empty(sizes, p.options().dtype(at::kChar));
  const uint8_t* src = p.const_data_ptr<uint8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  at::parallel_for(0, p.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      dst[2 * i] = lo_nibble(src[i]);
      dst[2 * i + 1] = hi_nibble(src[i]);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_int4_cpu(const at::Tensor& x_in, double clip) {
  check_cpu("quantize_int4", "x", x_in);
  TORCH_CHECK(x_in.dim() >= 1, "fair::quantize_int4: x must have at least one dimension");
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
              "fair::quantize_int4: x must be float32, bfloat16, float16 or float64, got ", dt);
  TORCH_CHECK(std::isfinite(clip) && clip > 0.0,
              "fair::quantize_int4: clip must be a finite number > 0, got ", clip);
  const int64_t K = x_in.size(-1);
  TORCH_CHECK(K % 2 == 0, "fair::quantize_int4: x's last dimension K must be even, got K=", K);
  const at::Tensor x = x_in.contiguous();
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = K / 2;
  at::Tensor packed = at::empty(sizes, x.options().dtype(at::kByte));
  sizes.pop_back();
  at::Tensor scale = at::empty(sizes, x.options().dtype(at::kFloat));
  const int64_t R = scale.numel();
  const KernelTable& kt = kernels(active_isa());
  uint8_t* out = packed.data_ptr<uint8_t>();
  float* sc = scale.data_ptr<float>();
  const float clip_f = float(clip);
  std::atomic<int64_t> bad_row{-1}, overflow_row{-1};
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    auto fbuf = aligned_buffer<float>(K);
    auto qbuf = aligned_buffer<int8_t>(K);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = row_as_float(x, r, K, fbuf.get());
      int32_t rowsum;
      if (!kt.quantize_row(row, K, clip_f, qbuf.get(), sc + r, &rowsum)) {
        int64_t none = -1;
        bad_row.compare_exchange_strong(none, r);
        return;
      }
      if (!std::isfinite(sc[r])) {  // finite row, clip > 1: clip * absmax overflowed
        int64_t none = -1;
        overflow_row.compare_exchange_strong(none, r);
        return;
      }
      uint8_t* o = out + r * (K / 2);
      for (int64_t j = 0; j < K / 2; ++j) {
        o[j] = uint8_t((qbuf[2 * j] & 0xF) | ((qbuf[2 * j + 1] & 0xF) << 4));
      }
    }
  });
  TORCH_CHECK(bad_row.load() < 0, "fair::quantize_int4: x has inf or NaN in row ", bad_row.load(),
              "; quantization needs finite input");
  if (overflow_row.load() >= 0) {
    fail_scale_overflow("quantize_int4", "clip", clip, x.reshape({R, K}), overflow_row.load());
  }
  return {packed, scale};
}

}  // namespace fair
