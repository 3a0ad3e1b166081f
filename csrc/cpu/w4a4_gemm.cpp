// CPU ops prepack_int4, w4a4_gemm, w4a4_linear and w4a4_linear_prepacked: the blocked,
// multi-threaded driver around the ISA kernels.
//
// 1. Weights: the GEMM reads the prepacked int4 layout (isa.h: blocks of 64 channels, quads of
//    4 k, nibbles stored as w + 8, still 4 bits per weight). W4A4Linear makes it once per weight
//    (fair::prepack_int4); the ops on the public pack_int4 layout prepack into a temporary first.
// 2. A: activations become an int8 buffer [Mp][Kp] (unpacked from `a`, or quantized from `x`
//    for the linear ops) plus per-row sums.
// 3. The output is cut into tasks of mc rows x a group of up to 4 blocks (256 channels), which
//    the threads take one by one from a shared counter. A task walks K in kKc blocks and runs
//    the ISA gemm over its rows for each: the VNNI kernel sweeps the group's blocks with one
//    6-row activation tile at a time (L1), the blocks' nibbles coming from L2.
// 4. The ISA epilogue turns the tile into the output: exact correction (-8 * rowsum, from the
//    w + 8 encoding), fp32 (acc * a_scale[m]) * w_scale[n] (+ bias[n]), cast to the out dtype.
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
namespace cpu {

// The reference epilogue (the vector ones match it bit for bit).
void epilogue_scalar(const int32_t* C, int64_t ldc, int64_t rows, int64_t cols,
                     const int32_t* rowsum, const float* a_scale, const float* w_scale,
                     const float* bias, void* out, int64_t ldo, OutKind kind) {
  for (int64_t i = 0; i < rows; ++i) {
    const int32_t corr = 8 * rowsum[i];
    const int32_t* c = C + i * ldc;
    for (int64_t j = 0; j < cols; ++j) {
      const int32_t acc = c[j] - corr;
      if (kind == OutKind::kI32) {
        static_cast<int32_t*>(out)[i * ldo + j] = acc;
        continue;
      }
      float v = (float(acc) * a_scale[i]) * w_scale[j];
      if (bias != nullptr) v = v + bias[j];
      switch (kind) {
        case OutKind::kF32: static_cast<float*>(out)[i * ldo + j] = v; break;
        case OutKind::kBF16:
          static_cast<c10::BFloat16*>(out)[i * ldo + j] = c10::BFloat16(v);
          break;
        default: static_cast<c10::Half*>(out)[i * ldo + j] = c10::Half(v); break;
      }
    }
  }
}

}  // namespace cpu

using namespace fair::cpu;

namespace {

#ifndef FAIR_KC
#define FAIR_KC 1024
#endif
constexpr int64_t kKc = FAIR_KC;  // k per block (a multiple of 64; nibble block 32 KB)
constexpr int64_t kMcMax = 256;   // rows per task
#ifndef FAIR_NGROUP
#define FAIR_NGROUP 4
#endif
constexpr int64_t kGroup = FAIR_NGROUP;  // 64-channel blocks per task

int64_t padded_k(int64_t K) { return round_up(K, kKAlign); }

struct ActBuffer {
  std::unique_ptr<int8_t[], FreeDeleter> q;        // [Mp][Kp]
  std::unique_ptr<int32_t[], FreeDeleter> rowsum;  // [Mp]
  int64_t M, Mp, K, Kp;
};

ActBuffer make_act_buffer(const KernelTable& kt, int64_t M, int64_t K) {
  ActBuffer a;
  a.M = M;
  a.K = K;
  a.Mp = round_up(M, kt.mr);
  a.Kp = padded_k(K);
  a.q = aligned_buffer<int8_t>(a.Mp * a.Kp);
  a.rowsum = aligned_buffer<int32_t>(a.Mp);
  // padding rows: zeros
  if (a.Mp > M) std::memset(a.q.get() + M * a.Kp, 0, size_t((a.Mp - M) * a.Kp));
  for (int64_t m = M; m < a.Mp; ++m) a.rowsum[m] = 0;
  return a;
}

struct Epilogue {
  const float* a_scale;  // [M] (unused for kI32)
  const float* w_scale;  // [N]
  const float* bias;     // [N] or null
  void* out;             // [M][N]
  OutKind kind;
};

size_t out_elem_size(OutKind kind) {
  return kind == OutKind::kF32 || kind == OutKind::kI32 ? 4 : 2;
}

// out[M, N] from activations `act` and prepacked weights Bp (ceil(N / 64) blocks).
void run_gemm(const KernelTable& kt, const ActBuffer& act, const uint8_t* Bp, int64_t N,
              const Epilogue& ep) {
  const int64_t M = act.M, Mp = act.Mp, K = act.K, Kp = act.Kp;
  const int64_t n_blocks = ceil_div(N, kBlockN), block_bytes = (Kp / 4) * kQuadBytes;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Channel groups of up to kGroup blocks (an activation tile is reused across a group), and
  // enough tasks to balance the threads; split M further only if the channel groups are few.
  const int64_t group = std::clamp<int64_t>(n_blocks / (2 * threads), 1, kGroup);
  const int64_t n_groups = ceil_div(n_blocks, group);
  int64_t mc = std::min(Mp, kMcMax);
  if (n_groups * ceil_div(Mp, mc) < 4 * threads) {
    const int64_t m_splits = ceil_div(4 * threads, n_groups);
    mc = std::min(mc, ceil_div(Mp, m_splits));
  }
  mc = round_up(std::max<int64_t>(mc, 1), std::max(kt.mr, kt.tile_m));
  const int64_t m_blocks = ceil_div(Mp, mc);
  const int64_t tasks = m_blocks * n_groups;
  const size_t esize = out_elem_size(ep.kind);
  const int64_t ldc = group * kBlockN;

  // Small problems run on the calling thread: waking the pool costs more than they do. Otherwise
  // each worker takes the next task from a shared counter (dynamic schedule): on a loaded
  // machine a descheduled thread then delays only its current task, not a fixed share.
  const int64_t workers = M * N * K < (int64_t(1) << 22) ? 1 : std::min(threads, tasks);
  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const int64_t kq_max = std::min(kKc, std::max<int64_t>(Kp, kKAlign)) / 4;
    auto scratch = aligned_buffer<uint8_t>(kq_max * 256);
    auto cbuf = aligned_buffer<int32_t>(mc * ldc);
    for (int64_t t = next_task++; t < tasks; t = next_task++) {
      const int64_t ng = t / m_blocks, mbk = t % m_blocks;
      const int64_t m0 = mbk * mc, rows_p = std::min(mc, Mp - m0);
      const int64_t rows = std::min(rows_p, M - m0);
      const int64_t b0 = ng * group, nb = std::min(group, n_blocks - b0);
      const int64_t n0 = b0 * kBlockN, cols = std::min(nb * kBlockN, N - n0);
      if (rows <= 0) continue;
      int32_t* C = cbuf.get();
      if (Kp == 0) std::memset(C, 0, size_t(rows_p * ldc) * sizeof(int32_t));
      const uint8_t* blocks = Bp + b0 * block_bytes;
      for (int64_t k0 = 0; k0 < Kp; k0 += kKc) {
        const int64_t kq = std::min(kKc, Kp - k0) / 4;
        kt.gemm(act.q.get() + m0 * Kp + k0, Kp, rows_p, blocks + (k0 / 4) * kQuadBytes,
                block_bytes, nb, kq, C, ldc, k0 > 0, scratch.get());
      }
      char* out = static_cast<char*>(ep.out) + (m0 * N + n0) * esize;
      kt.epilogue(C, ldc, rows, cols, act.rowsum.get() + m0,
                  ep.a_scale != nullptr ? ep.a_scale + m0 : nullptr, ep.w_scale + n0,
                  ep.bias != nullptr ? ep.bias + n0 : nullptr, out, N, ep.kind);
    }
  });
}

OutKind out_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return OutKind::kF32;
    case at::kBFloat16: return OutKind::kBF16;
    case at::kHalf: return OutKind::kF16;
    case at::kInt: return OutKind::kI32;
    default: TORCH_CHECK(false, "unsupported output dtype ", t);
  }
}

// Public packed W [N, K/2] (contiguous) -> prepacked uint8 [ceil(N/64), Kp/4, 128].
at::Tensor prepack(const at::Tensor& w, int64_t K) {
  const int64_t N = w.size(0), n_blocks = ceil_div(N, kBlockN), nq = padded_k(K) / 4;
  at::Tensor out = at::empty({n_blocks, nq, kQuadBytes}, w.options().dtype(at::kByte));
  if (n_blocks == 0 || nq == 0) return out;
  const uint8_t* src = w.const_data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t grain = N * K < (int64_t(1) << 22) ? n_blocks : 1;
  at::parallel_for(0, n_blocks, grain, [&](int64_t begin, int64_t end) {
    prepack_blocks(src, K / 2, N, K, begin * kBlockN, end - begin, dst + begin * nq * kQuadBytes);
  });
  return out;
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
}

void check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return;
  check_cpu(op, "bias", *bias);
  TORCH_CHECK(at::isFloatingType(bias->scalar_type()), "fair::", op,
              ": bias must be a floating tensor, got ", bias->scalar_type());
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "fair::", op,
              ": bias must have shape [N] = [", N, "], got ", bias->sizes());
}

void check_x(const char* op, const at::Tensor& x, double act_clip) {
  check_cpu(op, "x", x);
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "fair::", op,
              ": x must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(x.dim() >= 1, "fair::", op, ": x must have at least one dimension");
  TORCH_CHECK(x.size(-1) % 2 == 0, "fair::", op,
              ": x's last dimension K must be even for int4 packing, got K=", x.size(-1));
  TORCH_CHECK(std::isfinite(act_clip) && act_clip > 0.0, "fair::", op,
              ": act_clip must be a finite number > 0, got ", act_clip);
}

// Dynamic per-token quantization of x fused with the GEMM on prepacked weights Bp.
at::Tensor linear_impl(const char* op, const at::Tensor& x_in, const uint8_t* Bp, int64_t N,
                       const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                       double act_clip) {
  const int64_t K = x_in.size(-1);
  std::vector<int64_t> out_sizes = x_in.sizes().vec();
  out_sizes.back() = N;
  at::Tensor out = at::empty(out_sizes, x_in.options());
  const int64_t M = K > 0 ? x_in.numel() / K : out.numel() / std::max<int64_t>(N, 1);
  if (M == 0 || N == 0) return out;

  const at::Tensor x = x_in.contiguous();
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
  TORCH_CHECK(bad_row.load() < 0, "fair::", op, ": x has inf or NaN in row ", bad_row.load(),
              " (of the flattened [M, K] input); quantization needs finite input");
  if (overflow_row.load() >= 0) {
    fail_scale_overflow(op, "act_clip", act_clip, x.reshape({M, K}), overflow_row.load());
  }
  run_gemm(kt, act, Bp, N,
           {a_scale.get(), w_scale.const_data_ptr<float>(),
            bias.has_value() ? bias_f.const_data_ptr<float>() : nullptr, out.data_ptr(),
            out_kind(out.scalar_type())});
  return out;
}

}  // namespace

at::Tensor prepack_int4_cpu(const at::Tensor& w) {
  check_cpu("prepack_int4", "w", w);
  TORCH_CHECK(w.scalar_type() == at::kByte,
              "fair::prepack_int4: w must be uint8 (packed int4, [N, K/2]), got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 2, "fair::prepack_int4: w must be 2-D [N, K/2], got shape ", w.sizes());
  return prepack(w.contiguous(), 2 * w.size(1));
}

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
  check_bias(op, bias, w_in.size(0));
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

  const at::Tensor a = a_in.contiguous();
  const at::Tensor a_scale = a_scale_in.contiguous(), w_scale = w_scale_in.contiguous();
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  const at::Tensor wp = prepack(w_in.contiguous(), K);

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
  run_gemm(kt, act, wp.const_data_ptr<uint8_t>(), N,
           {a_scale.const_data_ptr<float>(), w_scale.const_data_ptr<float>(),
            bias.has_value() ? bias_f.const_data_ptr<float>() : nullptr, out.data_ptr(),
            out_kind(out_dtype)});
  return out;
}

at::Tensor w4a4_linear_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                           const std::optional<at::Tensor>& bias, double act_clip) {
  const char* op = "w4a4_linear";
  check_x(op, x, act_clip);
  check_weight(op, w, w_scale, bias);
  check_bias(op, bias, w.size(0));
  const int64_t K = x.size(-1);
  TORCH_CHECK(K == 2 * w.size(1), "fair::w4a4_linear: x's last dimension K=", K,
              " must equal 2 * w.size(1) = ", 2 * w.size(1));
  const at::Tensor wp = prepack(w.contiguous(), K);
  return linear_impl(op, x, wp.const_data_ptr<uint8_t>(), w.size(0), w_scale.contiguous(), bias,
                     act_clip);
}

at::Tensor w4a4_linear_prepacked_cpu(const at::Tensor& x, const at::Tensor& w_prepacked,
                                     const at::Tensor& w_scale,
                                     const std::optional<at::Tensor>& bias, double act_clip) {
  const char* op = "w4a4_linear_prepacked";
  check_x(op, x, act_clip);
  check_cpu(op, "w_prepacked", w_prepacked);
  check_cpu(op, "w_scale", w_scale);
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.dim() == 1,
              "fair::w4a4_linear_prepacked: w_scale must be float32 of shape [N], got ",
              w_scale.scalar_type(), " ", w_scale.sizes());
  const int64_t N = w_scale.size(0), K = x.size(-1);
  TORCH_CHECK(w_prepacked.scalar_type() == at::kByte && w_prepacked.dim() == 3 &&
                  w_prepacked.size(0) == ceil_div(N, kBlockN) &&
                  w_prepacked.size(1) == padded_k(K) / 4 && w_prepacked.size(2) == kQuadBytes,
              "fair::w4a4_linear_prepacked: w_prepacked must be the uint8 output of "
              "prepack_int4 for N=", N, " (w_scale) and K=", K, " (x), shape [",
              ceil_div(N, kBlockN), ", ", padded_k(K) / 4, ", ", kQuadBytes, "], got ",
              w_prepacked.scalar_type(), " ", w_prepacked.sizes());
  check_bias(op, bias, N);
  const at::Tensor wp = w_prepacked.contiguous();
  return linear_impl(op, x, wp.const_data_ptr<uint8_t>(), N, w_scale.contiguous(), bias,
                     act_clip);
}

}  // namespace fair
