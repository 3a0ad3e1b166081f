// CUDA implementations of the fair ops: argument checks, device guard, current stream, then the
// raw-pointer launchers of launchers.h. Schemas live in csrc/torch_bindings.cpp; this file only
// adds the CUDA kernels with TORCH_LIBRARY_IMPL(fair, CUDA, m).
//
// This is the only CUDA-side file that needs torch's CUDA headers (c10/cuda), so it builds only
// against a CUDA build of torch; the kernels themselves (*.cu) need nvcc alone. It is a .cpp
// compiled by the host compiler: nothing here runs on the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>

#include "launchers.h"

namespace {

using at::Tensor;

fair_cuda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return fair_cuda::DType::kFloat32;
    case at::kHalf: return fair_cuda::DType::kFloat16;
    case at::kBFloat16: return fair_cuda::DType::kBFloat16;
    case at::kDouble: return fair_cuda::DType::kFloat64;
    case at::kInt: return fair_cuda::DType::kInt32;
    default: TORCH_CHECK(false, "fair: unsupported dtype ", t);
  }
}

// Raises a clear error unless `device` can run the kernels of this build (sm_80 or newer).
void check_arch(const char* op, const Tensor& t) {
  const int dev = t.get_device();
  TORCH_CHECK(fair_cuda::device_supported(dev), "fair::", op, ": GPU ", dev, " has compute capability ",
              fair_cuda::device_capability(dev),
              " (major*10+minor); the fair CUDA kernels need sm_80 or newer");
}

void check_launch(const char* op, cudaError_t e) {
  TORCH_CHECK(e == cudaSuccess, "fair::", op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(e));
}

void check_same_device(const char* op, const Tensor& ref, const char* ref_name, const Tensor& t,
                       const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "fair::", op, ": expected `", name, "` on ",
              ref.device(), " (the device of `", ref_name, "`), got ", t.device());
}

void check_float_input(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16,
              "fair::", op, ": expected `", name, "` of dtype float32, float16 or bfloat16, got ",
              t.scalar_type());
}

// FAIR_CUDA_GEMM_PATH may force a GEMM path; reject a value the launcher would ignore.
void check_gemm_path_env() {
  const char* v = std::getenv("FAIR_CUDA_GEMM_PATH");
  if (v == nullptr || v[0] == '\0') return;
  TORCH_CHECK(std::strcmp(v, "auto") == 0 || std::strcmp(v, "int4") == 0 ||
                  std::strcmp(v, "int8") == 0 || std::strcmp(v, "simt") == 0,
              "fair: FAIR_CUDA_GEMM_PATH must be one of auto, int4, int8, simt; got '", v, "'");
}

Tensor pack_int4_cuda(const Tensor& q) {
  TORCH_CHECK(q.dim() == 2, "fair::pack_int4: expected `q` of shape [R, K], got ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kChar, "fair::pack_int4: expected `q` of dtype int8, got ",
              q.scalar_type());
  TORCH_CHECK(q.size(1) % 2 == 0, "fair::pack_int4: expected an even K (q.size(1)), got ",
              q.size(1));
  const c10::cuda::CUDAGuard guard(q.device());
  if (q.numel() > 0) {
    // Contract: values in [-8, 7]. Checking costs a sync, acceptable for this load-time op.
    const bool in_range = at::logical_and(q >= -8, q <= 7).all().item<bool>();
    TORCH_CHECK(in_range, "fair::pack_int4: expected `q` values in [-8, 7]");
  }
  const Tensor qc = q.contiguous();
  Tensor out = at::empty({q.size(0), q.size(1) / 2}, q.options().dtype(at::kByte));
  check_arch("pack_int4", q);
  check_launch("pack_int4",
               fair_cuda::launch_pack_int4(qc.data_ptr<int8_t>(), out.data_ptr<uint8_t>(),
                                           out.numel(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

Tensor unpack_int4_cuda(const Tensor& p) {
  TORCH_CHECK(p.dim() == 2, "fair::unpack_int4: expected `p` of shape [R, K/2], got ", p.sizes());
  TORCH_CHECK(p.scalar_type() == at::kByte, "fair::unpack_int4: expected `p` of dtype uint8, got ",
              p.scalar_type());
  const c10::cuda::CUDAGuard guard(p.device());
  const Tensor pc = p.contiguous();
  Tensor out = at::empty({p.size(0), p.size(1) * 2}, p.options().dtype(at::kChar));
  check_arch("unpack_int4", p);
  check_launch("unpack_int4",
               fair_cuda::launch_unpack_int4(pc.data_ptr<uint8_t>(), out.data_ptr<int8_t>(),
                                             pc.numel(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

// Quantizes a contiguous [R, K] view; shared by quantize_int4 and w4a4_linear.
std::tuple<Tensor, Tensor> quantize_rows(const char* op, const Tensor& x2d, double clip) {
  const int64_t rows = x2d.size(0), k = x2d.size(1);
  Tensor packed = at::empty({rows, k / 2}, x2d.options().dtype(at::kByte));
  Tensor scale = at::empty({rows}, x2d.options().dtype(at::kFloat));
  check_launch(op, fair_cuda::launch_quantize_int4(
                       x2d.data_ptr(), to_dtype(x2d.scalar_type()), rows, k,
                       static_cast<float>(clip), packed.data_ptr<uint8_t>(),
                       scale.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return {packed, scale};
}

void check_clip(const char* op, const char* name, double clip) {
  TORCH_CHECK(std::isfinite(clip) && clip > 0.0, "fair::", op, ": expected `", name,
              "` to be a finite number > 0, got ", clip);
}

std::tuple<Tensor, Tensor> quantize_int4_cuda(const Tensor& x, double clip) {
  TORCH_CHECK(x.dim() == 2, "fair::quantize_int4: expected `x` of shape [R, K], got ", x.sizes());
  check_float_input("quantize_int4", "x", x);
  TORCH_CHECK(x.size(1) % 2 == 0, "fair::quantize_int4: expected an even K (x.size(1)), got ",
              x.size(1));
  check_clip("quantize_int4", "clip", clip);
  const c10::cuda::CUDAGuard guard(x.device());
  check_arch("quantize_int4", x);
  return quantize_rows("quantize_int4", x.contiguous(), clip);
}

// Shared checks and launch of the GEMM on packed operands. a [M, K/2], w [N, K/2].
Tensor gemm_packed(const char* op, const Tensor& a, const Tensor& a_scale, const Tensor& w,
                   const Tensor& w_scale, const std::optional<Tensor>& bias,
                   at::ScalarType out_dtype) {
  const int64_t m = a.size(0), n = w.size(0), k = a.size(1) * 2;
  Tensor out = at::empty({m, n}, a.options().dtype(out_dtype));
  if (m == 0 || n == 0) return out;
  check_gemm_path_env();
  const Tensor ac = a.contiguous(), wc = w.contiguous();
  const Tensor asc = a_scale.contiguous(), wsc = w_scale.contiguous();
  Tensor b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();
  check_launch(op, fair_cuda::launch_w4a4_gemm(
                       ac.data_ptr<uint8_t>(), asc.data_ptr<float>(), wc.data_ptr<uint8_t>(),
                       wsc.data_ptr<float>(), bias.has_value() ? b32.data_ptr<float>() : nullptr,
                       out.data_ptr(), to_dtype(out_dtype), m, n, k, a.get_device(),
                       fair_cuda::GemmPath::kAuto, c10::cuda::getCurrentCUDAStream()));
  return out;
}

void check_weight(const char* op, const Tensor& ref, const char* ref_name, const Tensor& w,
                  const Tensor& w_scale, const std::optional<Tensor>& bias, int64_t k_bytes) {
  TORCH_CHECK(w.dim() == 2, "fair::", op, ": expected `w` of shape [N, K/2], got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kByte, "fair::", op, ": expected `w` of dtype uint8 (packed int4), got ",
              w.scalar_type());
  TORCH_CHECK(w.size(1) == k_bytes, "fair::", op, ": expected `w` with K/2 = ", k_bytes,
              " columns (from `", ref_name, "`), got ", w.size(1));
  TORCH_CHECK(w_scale.dim() == 1 && w_scale.size(0) == w.size(0), "fair::", op,
              ": expected `w_scale` of shape [", w.size(0), "], got ", w_scale.sizes());
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat, "fair::", op,
              ": expected `w_scale` of dtype float32, got ", w_scale.scalar_type());
  check_same_device(op, ref, ref_name, w, "w");
  check_same_device(op, ref, ref_name, w_scale, "w_scale");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), "fair::", op,
                ": expected `bias` of shape [", w.size(0), "], got ", bias->sizes());
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()), "fair::", op,
                ": expected a floating-point `bias`, got ", bias->scalar_type());
    check_same_device(op, ref, ref_name, *bias, "bias");
  }
}

Tensor w4a4_gemm_cuda(const Tensor& a, const Tensor& a_scale, const Tensor& w,
                      const Tensor& w_scale, const std::optional<Tensor>& bias,
                      at::ScalarType out_dtype) {
  const char* op = "w4a4_gemm";
  TORCH_CHECK(a.dim() == 2, "fair::w4a4_gemm: expected `a` of shape [M, K/2], got ", a.sizes());
  TORCH_CHECK(a.scalar_type() == at::kByte,
              "fair::w4a4_gemm: expected `a` of dtype uint8 (packed int4), got ", a.scalar_type());
  TORCH_CHECK(a_scale.dim() == 1 && a_scale.size(0) == a.size(0),
              "fair::w4a4_gemm: expected `a_scale` of shape [", a.size(0), "], got ",
              a_scale.sizes());
  TORCH_CHECK(a_scale.scalar_type() == at::kFloat,
              "fair::w4a4_gemm: expected `a_scale` of dtype float32, got ", a_scale.scalar_type());
  check_same_device(op, a, "a", a_scale, "a_scale");
  check_weight(op, a, "a", w, w_scale, bias, a.size(1));
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
              "fair::w4a4_gemm: expected `out_dtype` float32, float16 or bfloat16, got ",
              out_dtype);
  const c10::cuda::CUDAGuard guard(a.device());
  check_arch(op, a);
  return gemm_packed(op, a, a_scale, w, w_scale, bias, out_dtype);
}

Tensor w4a4_linear_cuda(const Tensor& x, const Tensor& w, const Tensor& w_scale,
                        const std::optional<Tensor>& bias, double act_clip) {
  const char* op = "w4a4_linear";
  TORCH_CHECK(x.dim() >= 1, "fair::w4a4_linear: expected `x` of shape [..., K], got ", x.sizes());
  check_float_input(op, "x", x);
  const int64_t k = x.size(-1);
  TORCH_CHECK(k % 2 == 0, "fair::w4a4_linear: expected an even K (x.size(-1)), got ", k);
  check_weight(op, x, "x", w, w_scale, bias, k / 2);
  check_clip(op, "act_clip", act_clip);
  const c10::cuda::CUDAGuard guard(x.device());
  check_arch(op, x);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = w.size(0);
  const Tensor x2d = x.reshape({-1, k}).contiguous();
  if (x2d.size(0) == 0) return at::empty(out_shape, x.options());
  // One quantize kernel, then the GEMM: the only extra traffic is the packed int4 activation.
  auto [packed, scale] = quantize_rows(op, x2d, act_clip);
  return gemm_packed(op, packed, scale, w, w_scale, bias, x.scalar_type()).view(out_shape);
}

// Row weights: `w` broadcast against the position dims a.shape[:-1], in the accumulation dtype.
Tensor row_weights(const char* op, const Tensor& a, const Tensor& w) {
  const at::IntArrayRef pos = a.sizes().slice(0, a.dim() - 1);
  TORCH_CHECK(w.dim() <= static_cast<int64_t>(pos.size()), "fair::", op,
              ": `w` of shape ", w.sizes(), " does not broadcast to the position shape ", pos);
  for (int64_t i = 1; i <= w.dim(); ++i) {
    const int64_t ws = w.size(-i), ps = pos[pos.size() - i];
    TORCH_CHECK(ws == ps || ws == 1, "fair::", op, ": `w` of shape ", w.sizes(),
                " does not broadcast to the position shape ", pos);
  }
  const at::ScalarType acc = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return w.to(acc).expand(pos).contiguous();
}

void check_wmse_inputs(const char* op, const Tensor& a, const Tensor& b, const Tensor& w) {
  TORCH_CHECK(a.dim() >= 2, "fair::", op, ": expected `a` of shape [..., N, D], got ", a.sizes());
  TORCH_CHECK(b.sizes() == a.sizes(), "fair::", op, ": expected `b` of shape ", a.sizes(),
              " (the shape of `a`), got ", b.sizes());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), "fair::", op, ": expected `b` of dtype ",
              a.scalar_type(), " (the dtype of `a`), got ", b.scalar_type());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kHalf ||
                  a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kDouble,
              "fair::", op, ": expected `a` of a floating dtype, got ", a.scalar_type());
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), "fair::", op,
              ": expected a floating-point `w`, got ", w.scalar_type());
  check_same_device(op, a, "a", b, "b");
  check_same_device(op, a, "a", w, "w");
}

Tensor weighted_mse_cuda(const Tensor& a, const Tensor& b, const Tensor& w) {
  const char* op = "weighted_mse";
  check_wmse_inputs(op, a, b, w);
  const c10::cuda::CUDAGuard guard(a.device());
  check_arch(op, a);
  const Tensor rw = row_weights(op, a, w);
  const Tensor ac = a.contiguous(), bc = b.contiguous();
  const int64_t d = a.size(-1), rows = d > 0 ? a.numel() / d : 0;
  Tensor partials = at::empty({fair_cuda::weighted_mse_num_partials(rows, d)}, rw.options());
  Tensor result = at::empty({}, rw.options());
  check_launch(op, fair_cuda::launch_weighted_mse(ac.data_ptr(), bc.data_ptr(), rw.data_ptr(),
                                                  to_dtype(a.scalar_type()), rows, d,
                                                  partials.data_ptr(), result.data_ptr(),
                                                  c10::cuda::getCurrentCUDAStream()));
  return result.to(a.scalar_type());
}

std::tuple<Tensor, Tensor> weighted_mse_backward_cuda(const Tensor& grad, const Tensor& a,
                                                      const Tensor& b, const Tensor& w) {
  const char* op = "weighted_mse_backward";
  check_wmse_inputs(op, a, b, w);
  TORCH_CHECK(grad.numel() == 1, "fair::", op, ": expected a scalar `grad`, got ", grad.sizes());
  check_same_device(op, a, "a", grad, "grad");
  const c10::cuda::CUDAGuard guard(a.device());
  check_arch(op, a);
  const Tensor rw = row_weights(op, a, w);
  const Tensor g = grad.reshape({1}).to(rw.scalar_type()).contiguous();
  const Tensor ac = a.contiguous(), bc = b.contiguous();
  const int64_t d = a.size(-1), rows = d > 0 ? a.numel() / d : 0;
  Tensor ga = at::empty(a.sizes(), ac.options()), gb = at::empty(a.sizes(), ac.options());
  check_launch(op, fair_cuda::launch_weighted_mse_backward(
                       g.data_ptr(), ac.data_ptr(), bc.data_ptr(), rw.data_ptr(),
                       to_dtype(a.scalar_type()), rows, d, ga.data_ptr(), gb.data_ptr(),
                       c10::cuda::getCurrentCUDAStream()));
  return {ga, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fair, CUDA, m) {
  m.impl("pack_int4", &pack_int4_cuda);
  m.impl("unpack_int4", &unpack_int4_cuda);
  m.impl("quantize_int4", &quantize_int4_cuda);
  m.impl("w4a4_gemm", &w4a4_gemm_cuda);
  m.impl("w4a4_linear", &w4a4_linear_cuda);
  m.impl("weighted_mse", &weighted_mse_cuda);
  m.impl("weighted_mse_backward", &weighted_mse_backward_cuda);
}
