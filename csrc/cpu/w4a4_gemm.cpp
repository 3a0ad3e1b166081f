// CPU ops w4a4_gemm and w4a4_linear: the blocked, multi-threaded driver around the ISA kernels.
//
// 1. A: activations become an int8 buffer [Mp][Kp] (unpacked from `a`, or quantized from `x`
//    for w4a4_linear) plus per-row sums.
// 2. The output is cut into tasks of MC rows x NC channels, spread over at::parallel_for. Each
//    task walks K in KC blocks: it reorders its NC x KC slice of the public packed weights into
//    the kernel's panel layout (isa.h) in a thread-local, cache-resident buffer, then runs the ISA
//    gemm into an int32 tile. Weights are thus reordered on the fly, once per task, and never
//    stored twice: pack_int4's public layout stays the only one.
// 3. The task's tile gets the exact correction (-8 * rowsum for offset paths) and the fp32
//    epilogue (acc * a_scale[m]) * w_scale[n] (+ bias[n]), then the cast to the output dtype.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "cpu/common.h"
#include "cpu/isa.h"
#include "ops.h"

namespace fair {
using namespace fair::cpu;

namespace {

constexpr int64_t kNc = 64;    // channels per task (a multiple of 32: 4 panels)
#ifndef FAIR_KC
#define FAIR_KC 1024
#endif
constexpr int64_t kKc = FAIR_KC;  // k per block (a multiple of 64)
constexpr int64_t kMcMax = 1024;

struct ActBuffer {
  std::unique_ptr<int8_t[], FreeDeleter> q;  // [Mp][Kp]
  std::unique_ptr<int32_t[], FreeDeleter> rowsum;  // [Mp]
  int64_t M, Mp, K, Kp;
};

ActBuffer make_act_buffer(const KernelTable& kt, int64_t M, int64_t K) {
  ActBuffer a;
  a.M = M;
  a.K = K;
  a.Mp = round_up(M, kt.mr);
  a.Kp = round_up(K, 64);
  a.q = aligned_buffer<int8_t>(a.Mp * a.Kp);
  a.rowsum = aligned_buffer<int32_t>(a.Mp);
  // padding rows: zeros
  if (a.Mp > M) std::memset(a.q.get() + M * a.Kp, 0, size_t((a.Mp - M) * a.Kp));
  for (int64_t m = M; m < a.Mp; ++m) a.rowsum[m] = 0;
  return a;
}

// Runs the blocked GEMM; epi(C, ldc, m0, rows, n0, cols) receives each finished task tile with
// exact int32 accumulators for rows [m0, m0+rows) < M and channels [n0, n0+cols) < N.
template <typename Epilogue>
void run_gemm(const KernelTable& kt, const ActBuffer& act, const uint8_t* W, int64_t N,
              const Epilogue& epi) {
  const int64_t M = act.M, Mp = act.Mp, K = act.K, Kp = act.Kp;
  const int64_t n_blocks = ceil_div(N, kNc);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Enough tasks to balance the threads; split M only if the channel blocks are too few
  // (every M split re-packs the weights once more).
  int64_t mc = std::min(Mp, kMcMax);
  if (n_blocks < 4 * threads) {
    const int64_t m_splits = ceil_div(4 * threads, n_blocks);
    mc = std::min(mc, ceil_div(Mp, m_splits));
  }
  mc = round_up(std::max<int64_t>(mc, 1), kt.mr);
  const int64_t m_blocks = ceil_div(Mp, mc);
  const int64_t tasks = m_blocks * n_blocks;

  // small problems run on the calling thread: waking the pool costs more than they do
  const int64_t grain = M * N * K < (int64_t(1) << 22) ? tasks : 1;
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    const int64_t panels_max = round_up(kNc / 16, kt.panel_multiple);
    auto bbuf = aligned_buffer<uint8_t>(panels_max * (std::min(kKc, Kp) / 4) * 64);
    auto cbuf = aligned_buffer<int32_t>(mc * panels_max * 16);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nb = t / m_blocks, mbk = t % m_blocks;
      const int64_t m0 = mbk * mc, rows_p = std::min(mc, Mp - m0);
      const int64_t rows = std::min(rows_p, M - m0);
      const int64_t n0 = nb * kNc, cols = std::min(kNc, N - n0);
      if (rows <= 0) continue;
      const int64_t npanels = round_up(ceil_div(cols, 16), kt.panel_multiple);
      const int64_t ldc = npanels * 16;
      int32_t* C = cbuf.get();
      if (Kp == 0) std::memset(C, 0, size_t(rows_p * ldc) * sizeof(int32_t));
      for (int64_t k0 = 0; k0 < Kp; k0 += kKc) {
        const int64_t kq = std::min(kKc, Kp - k0) / 4;
        kt.pack_panels(W, N, K, n0, npanels, k0, kq, kt.weight_offset, bbuf.get());
        kt.gemm(act.q.get() + m0 * Kp + k0, Kp, rows_p, bbuf.get(), npanels, kq, C, ldc, k0 > 0);
      }
      if (kt.weight_offset) {  // remove the + 8 * rowsum(A) of the u = w + 8 encoding
        for (int64_t i = 0; i < rows; ++i) {
          const int32_t corr = 8 * act.rowsum[m0 + i];
          int32_t* c = C + i * ldc;
          for (int64_t j = 0; j < cols; ++j) c[j] -= corr;
        }
      }
      epi(C, ldc, m0, rows, n0, cols);
    }
  });
}

template <typename T>
inline T from_float(float v) {
  return T(v);
}

// out[m, n] = ((float)acc * a_scale[m]) * w_scale[n] (+ bias[n]), fp32, then cast to T.
template <typename T>
void scaled_epilogue(const KernelTable& kt, const ActBuffer& act, const uint8_t* W, int64_t N,
                     const float* a_scale, const float* w_scale, const float* bias, T* out) {
  run_gemm(kt, act, W, N,
           [&](const int32_t* C, int64_t ldc, int64_t m0, int64_t rows, int64_t n0, int64_t cols) {
             for (int64_t i = 0; i < rows; ++i) {
               const float sa = a_scale[m0 + i];
               const int32_t* c = C + i * ldc;
               T* o = out + (m0 + i) * N + n0;
               if (bias != nullptr) {
                 for (int64_t j = 0; j < cols; ++j) {
                   o[j] = from_float<T>((float(c[j]) * sa) * w_scale[n0 + j] + bias[n0 + j]);
                 }
               } else {
                 for (int64_t j = 0; j < cols; ++j) {
                   o[j] = from_float<T>((float(c[j]) * sa) * w_scale[n0 + j]);
                 }
               }
             }
           });
}

void gemm_to(const KernelTable& kt, const ActBuffer& act, const uint8_t* W, int64_t N,
             const float* a_scale, const float* w_scale, const float* bias, at::Tensor& out) {
  switch (out.scalar_type()) {
    case at::kFloat:
      return scaled_epilogue(kt, act, W, N, a_scale, w_scale, bias, out.data_ptr<float>());
    case at::kBFloat16:
      return scaled_epilogue(kt, act, W, N, a_scale, w_scale, bias,
                             out.data_ptr<c10::BFloat16>());
    case at::kHalf:
      return scaled_epilogue(kt, act, W, N, a_scale, w_scale, bias, out.data_ptr<c10::Half>());
    case at::kInt: {
      int32_t* o = out.data_ptr<int32_t>();
      return run_gemm(kt, act, W, N,
                      [&](const int32_t* C, int64_t ldc, int64_t m0, int64_t rows, int64_t n0,
                          int64_t cols) {
                        for (int64_t i = 0; i < rows; ++i) {
                          std::memcpy(o + (m0 + i) * N + n0, C + i * ldc,
                                      size_t(cols) * sizeof(int32_t));
                        }
                      });
    }
    default: TORCH_CHECK(false, "unsupported output dtype ", out.scalar_type());
  }
}

void check_weight(const char* op, const at::Tensor& w, const at::Tensor& w_scale,
                  const std::optional<at::Tensor>& bias) {
  check_cpu(op, "w", w);
  check_cpu(op, "w_scale", w_scale);
  TORCH_CHECK(w.scalar_type() == at::kByte, "fair::", op,
              ": w must be uint8 (packed int4, [N, K/2]), got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 2, "fair::", op, ": w must be 2-D [N, K/2], got shape ", w.sizes());
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat, "fair::", op, ": w_scale must be float32, got ",
              w_scale.scalar_type());
  TORCH_CHECK(w_scale.dim() == 1 && w_scale.size(0) == w.size(0), "fair::", op,
              ": w_scale must have shape [N] = [", w.size(0), "], got ", w_scale.sizes());
  if (bias.has_value()) {
    check_cpu(op, "bias", *bias);
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()), "fair::", op,
                ": bias must be a floating tensor, got ", bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), "fair::", op,
                ": bias must have shape [N] = [", w.size(0), "], got ", bias->sizes());
  }
}

}  // namespace

at::Tensor w4a4_gemm_cpu(const at::Tensor& a_in, const at::Tensor& a_scale_in,
                         const at::Tensor& w_in, const at::Tensor& w_scale_in,
                         const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  const char* op = "w4a4_gemm";
  check_cpu(op, "a", a_in);
  check_cpu(op, "a_scale", a_scale_in);
  TORCH_CHECK(a_in.scalar_type() == at::kByte, "fair::w4a4_gemm: a must be uint8 (packed int4, "
              "[M, K/2]), got ", a_in.scalar_type());
  TORCH_CHECK(a_in.dim() == 2, "fair::w4a4_gemm: a must be 2-D [M, K/2], got shape ",
              a_in.sizes());
  check_weight(op, w_in, w_scale_in, bias);
  TORCH_CHECK(a_in.size(1) == w_in.size(1), "fair::w4a4_gemm: a and w must have the same packed "
              "K/2, got a: ", a_in.size(1), " and w: ", w_in.size(1));
  TORCH_CHECK(a_scale_in.scalar_type() == at::kFloat, "fair::w4a4_gemm: a_scale must be float32, "
              "got ", a_scale_in.scalar_type());
  TORCH_CHECK(a_scale_in.dim() == 1 && a_scale_in.size(0) == a_in.size(0),
              "fair::w4a4_gemm: a_scale must have shape [M] = [", a_in.size(0), "], got ",
              a_scale_in.sizes());
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf ||
                  out_dtype == at::kInt,
              "fair::w4a4_gemm: out_dtype must be float32, bfloat16, float16 or int32 (raw "
              "accumulator), got ", out_dtype);
  TORCH_CHECK(out_dtype != at::kInt || !bias.has_value(),
              "fair::w4a4_gemm: bias must be None when out_dtype is int32 (raw accumulator)");

  const int64_t M = a_in.size(0), N = w_in.size(0), K = 2 * a_in.size(1);
  at::Tensor out = at::empty({M, N}, a_in.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;

  const at::Tensor a = a_in.contiguous(), w = w_in.contiguous();
  const at::Tensor a_scale = a_scale_in.contiguous(), w_scale = w_scale_in.contiguous();
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();

  const KernelTable& kt = kernels(active_isa());
  ActBuffer act = make_act_buffer(kt, M, K);
  const uint8_t* ap = a.const_data_ptr<uint8_t>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const uint8_t* src = ap + m * (K / 2);
      int8_t* dst = act.q.get() + m * act.Kp;
      int32_t sum = 0;
      for (int64_t j = 0; j < K / 2; ++j) {
        dst[2 * j] = lo_nibble(src[j]);
        dst[2 * j + 1] = hi_nibble(src[j]);
        sum += dst[2 * j] + dst[2 * j + 1];
      }
      std::memset(dst + K, 0, size_t(act.Kp - K));
      act.rowsum[m] = sum;
    }
  });
  gemm_to(kt, act, w.const_data_ptr<uint8_t>(), N, a_scale.const_data_ptr<float>(),
          w_scale.const_data_ptr<float>(), bias.has_value() ? bias_f.const_data_ptr<float>() : nullptr,
          out);
  return out;
}

at::Tensor w4a4_linear_cpu(const at::Tensor& x_in, const at::Tensor& w_in,
                           const at::Tensor& w_scale_in, const std::optional<at::Tensor>& bias,
                           double act_clip) {
  const char* op = "w4a4_linear";
  check_cpu(op, "x", x_in);
  check_weight(op, w_in, w_scale_in, bias);
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "fair::w4a4_linear: x must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(x_in.dim() >= 1, "fair::w4a4_linear: x must have at least one dimension");
  const int64_t K = x_in.size(-1);
  TORCH_CHECK(K % 2 == 0, "fair::w4a4_linear: x's last dimension K must be even for int4 "
              "packing, got K=", K);
  TORCH_CHECK(K == 2 * w_in.size(1), "fair::w4a4_linear: x's last dimension K=", K,
              " must equal 2 * w.size(1) = ", 2 * w_in.size(1));
  TORCH_CHECK(std::isfinite(act_clip) && act_clip > 0.0,
              "fair::w4a4_linear: act_clip must be a finite number > 0, got ", act_clip);

  const int64_t N = w_in.size(0);
  std::vector<int64_t> out_sizes = x_in.sizes().vec();
  out_sizes.back() = N;
  at::Tensor out = at::empty(out_sizes, x_in.options());
  const int64_t M = K > 0 ? x_in.numel() / K : out.numel() / std::max<int64_t>(N, 1);
  if (M == 0 || N == 0) return out;

  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous(),
                   w_scale = w_scale_in.contiguous();
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();

  const KernelTable& kt = kernels(active_isa());
  ActBuffer act = make_act_buffer(kt, M, K);
  auto a_scale = aligned_buffer<float>(M);
  const float clip_f = float(act_clip);
  std::atomic<int64_t> bad_row{-1}, overflow_row{-1};
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    auto fbuf = aligned_buffer<float>(K);
    for (int64_t m = begin; m < end; ++m) {
      int8_t* dst = act.q.get() + m * act.Kp;
      const float* row = row_as_float(x, m, K, fbuf.get());
      if (!kt.quantize_row(row, K, clip_f, dst, &a_scale[m], &act.rowsum[m])) {
        int64_t none = -1;
        bad_row.compare_exchange_strong(none, m);
        return;
      }
      if (!std::isfinite(a_scale[m])) {  // finite row, act_clip > 1: the scale overflowed
        int64_t none = -1;
        overflow_row.compare_exchange_strong(none, m);
        return;
      }
      std::memset(dst + K, 0, size_t(act.Kp - K));
    }
  });
  TORCH_CHECK(bad_row.load() < 0, "fair::w4a4_linear: x has inf or NaN in row ", bad_row.load(),
              " (of the flattened [M, K] input); quantization needs finite input");
  if (overflow_row.load() >= 0) {
    fail_scale_overflow("w4a4_linear", "act_clip", act_clip, x.reshape({M, K}), overflow_row.load());
  }
  at::Tensor out2d = out.view({M, N});
  gemm_to(kt, act, w.const_data_ptr<uint8_t>(), N, a_scale.get(),
          w_scale.const_data_ptr<float>(), bias.has_value() ? bias_f.const_data_ptr<float>() : nullptr,
          out2d);
  return out;
}

}  // namespace fair
