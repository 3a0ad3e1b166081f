// CUDA implementations of the fair ops: argument checks, device guard, current stream, then the
// raw-pointer launchers of launchers.h. Schemas live in csrc/torch_bindings.cpp; this file only
// adds the CUDA kernels with TORCH_LIBRARY_IMPL(fair, CUDA, m).
//
// This is the only CUDA-side file that needs torch's CUDA headers (c10/cuda), so it builds only
// against a CUDA build of torch; the kernels themselves (*.cu) need nvcc alone. It is a .cpp
// compiled by the host compiler: nothing here runs on the device.
#include <ATen/ATen.h>
#include <c10/util/accumulate.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

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

// Same wording as the CPU checks (csrc/cpu/common.h), naming the offending argument.
void check_same_device(const char* op, const Tensor& ref, const Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "fair::", op,
              ": all tensors must be on the same device; ", name, " is on ", t.device(),
              ", expected ", ref.device());
}

void check_cuda(const char* op, const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fair::", op, ": all tensors must be on the same device; ", name,
              " is on ", t.device(), ", expected a CUDA device");
}

// FAIR_CUDA_GEMM_PATH may force a GEMM path; reject a value the launcher would ignore.
void check_gemm_path_env() {
  const char* v = std::getenv("FAIR_CUDA_GEMM_PATH");
  if (v == nullptr || v[0] == '\0') return;
  TORCH_CHECK(std::strcmp(v, "auto") == 0 || std::strcmp(v, "int4") == 0 ||
                  std::strcmp(v, "int8") == 0 || std::strcmp(v, "simt") == 0,
              "fair: FAIR_CUDA_GEMM_PATH must be one of auto, int4, int8, simt; got '", v, "'");
}

std::vector<int64_t> with_last(const Tensor& t, int64_t last) {
  std::vector<int64_t> sizes = t.sizes().vec();
  sizes.back() = last;
  return sizes;
}

Tensor pack_int4_cuda(const Tensor& q) {
  const char* op = "pack_int4";
  check_cuda(op, q, "q");
  TORCH_CHECK(q.dim() >= 1, "fair::pack_int4: q must have at least one dimension");
  TORCH_CHECK(q.scalar_type() == at::kChar, "fair::pack_int4: q must be int8, got ",
              q.scalar_type());
  const int64_t k = q.size(-1);
  TORCH_CHECK(k % 2 == 0, "fair::pack_int4: q's last dimension K must be even, got K=", k);
  const c10::cuda::CUDAGuard guard(q.device());
  check_arch(op, q);
  if (q.numel() > 0) {
    // Contract: values in [-8, 7]. The check costs a device sync; pack_int4 runs at load time.
    const bool in_range = at::logical_and(q >= -8, q <= 7).all().item<bool>();
    TORCH_CHECK(in_range, "fair::pack_int4: q values must lie in [-8, 7]");
  }
  const Tensor qc = q.contiguous();
  Tensor out = at::empty(with_last(q, k / 2), q.options().dtype(at::kByte));
  check_launch(op, fair_cuda::launch_pack_int4(qc.data_ptr<int8_t>(), out.data_ptr<uint8_t>(),
                                               out.numel(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

Tensor unpack_int4_cuda(const Tensor& p) {
  const char* op = "unpack_int4";
  check_cuda(op, p, "packed");
  TORCH_CHECK(p.dim() >= 1, "fair::unpack_int4: packed must have at least one dimension");
  TORCH_CHECK(p.scalar_type() == at::kByte, "fair::unpack_int4: packed must be uint8, got ",
              p.scalar_type());
  const c10::cuda::CUDAGuard guard(p.device());
  check_arch(op, p);
  const Tensor pc = p.contiguous();
  Tensor out = at::empty(with_last(p, p.size(-1) * 2), p.options().dtype(at::kChar));
  check_launch(op, fair_cuda::launch_unpack_int4(pc.data_ptr<uint8_t>(), out.data_ptr<int8_t>(),
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

std::tuple<Tensor, Tensor> quantize_int4_cuda(const Tensor& x, double clip) {
  const char* op = "quantize_int4";
  check_cuda(op, x, "x");
  TORCH_CHECK(x.dim() >= 1, "fair::quantize_int4: x must have at least one dimension");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
              "fair::quantize_int4: x must be float32, bfloat16, float16 or float64, got ", dt);
  TORCH_CHECK(std::isfinite(clip) && clip > 0.0,
              "fair::quantize_int4: clip must be a finite number > 0, got ", clip);
  const int64_t k = x.size(-1);
  TORCH_CHECK(k % 2 == 0, "fair::quantize_int4: x's last dimension K must be even, got K=", k);
  const c10::cuda::CUDAGuard guard(x.device());
  check_arch(op, x);
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  const int64_t rows = c10::multiply_integers(lead);
  const Tensor x2d = x.contiguous().reshape({rows, k});
  auto [packed, scale] = quantize_rows(op, x2d, clip);
  if (rows > 0 && !at::isfinite(scale).all().item<bool>()) {
    // The kernel marks a row with inf/NaN by a NaN scale; a finite row whose clip * absmax
    // overflows fp32 (clip > 1) gets an inf scale and codes 0. Raise like the CPU op does; this
    // costs a device sync, so w4a4_linear (the hot path) skips it and lets NaN propagate.
    const Tensor bad = scale.isnan().nonzero();
    TORCH_CHECK(bad.numel() == 0, "fair::quantize_int4: x has inf or NaN in row ",
                bad.numel() > 0 ? bad[0].item<int64_t>() : -1, "; quantization needs finite input");
    const int64_t row = scale.isinf().nonzero()[0].item<int64_t>();
    TORCH_CHECK(false, "fair::quantize_int4: the int4 scale clip * absmax / 7 of x's row ", row,
                " overflows float32 (clip=", clip, ", absmax=",
                x2d[row].abs().max().item<double>(), "); use a smaller clip or rescale x");
  }
  std::vector<int64_t> psizes = lead;
  psizes.push_back(k / 2);
  return {packed.view(psizes), scale.view(lead)};
}

void check_weight(const char* op, const Tensor& ref, const Tensor& w, const Tensor& w_scale,
                  const std::optional<Tensor>& bias) {
  check_same_device(op, ref, w, "w");
  check_same_device(op, ref, w_scale, "w_scale");
  TORCH_CHECK(w.scalar_type() == at::kByte, "fair::", op,
              ": w must be uint8 (packed int4, [N, K/2]), got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 2, "fair::", op, ": w must be 2-D [N, K/2], got shape ", w.sizes());
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat, "fair::", op, ": w_scale must be float32, got ",
              w_scale.scalar_type());
  TORCH_CHECK(w_scale.dim() == 1 && w_scale.size(0) == w.size(0), "fair::", op,
              ": w_scale must have shape [N] = [", w.size(0), "], got ", w_scale.sizes());
  if (bias.has_value()) {
    check_same_device(op, ref, *bias, "bias");
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()), "fair::", op,
                ": bias must be a floating tensor, got ", bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), "fair::", op,
                ": bias must have shape [N] = [", w.size(0), "], got ", bias->sizes());
  }
}

// GEMM launch on checked packed operands a [M, K/2], w [N, K/2] into out [M, N].
void gemm_into(const char* op, const Tensor& a, const Tensor& a_scale, const Tensor& w,
               const Tensor& w_scale, const std::optional<Tensor>& bias, Tensor& out) {
  const int64_t m = a.size(0), n = w.size(0), k = a.size(1) * 2;
  if (m == 0 || n == 0) return;
  check_gemm_path_env();
  const Tensor ac = a.contiguous(), wc = w.contiguous();
  const Tensor asc = a_scale.contiguous(), wsc = w_scale.contiguous();
  Tensor b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();
  check_launch(op, fair_cuda::launch_w4a4_gemm(
                       ac.data_ptr<uint8_t>(), asc.data_ptr<float>(), wc.data_ptr<uint8_t>(),
                       wsc.data_ptr<float>(), bias.has_value() ? b32.data_ptr<float>() : nullptr,
                       out.data_ptr(), to_dtype(out.scalar_type()), m, n, k, a.get_device(),
                       fair_cuda::GemmPath::kAuto, c10::cuda::getCurrentCUDAStream()));
}

Tensor w4a4_gemm_cuda(const Tensor& a, const Tensor& a_scale, const Tensor& w,
                      const Tensor& w_scale, const std::optional<Tensor>& bias,
                      at::ScalarType out_dtype) {
  const char* op = "w4a4_gemm";
  check_cuda(op, a, "a");
  check_same_device(op, a, a_scale, "a_scale");
  TORCH_CHECK(a.scalar_type() == at::kByte, "fair::w4a4_gemm: a must be uint8 (packed int4, "
              "[M, K/2]), got ", a.scalar_type());
  TORCH_CHECK(a.dim() == 2, "fair::w4a4_gemm: a must be 2-D [M, K/2], got shape ", a.sizes());
  check_weight(op, a, w, w_scale, bias);
  TORCH_CHECK(a.size(1) == w.size(1), "fair::w4a4_gemm: a and w must have the same packed "
              "K/2, got a: ", a.size(1), " and w: ", w.size(1));
  TORCH_CHECK(a_scale.scalar_type() == at::kFloat, "fair::w4a4_gemm: a_scale must be float32, "
              "got ", a_scale.scalar_type());
  TORCH_CHECK(a_scale.dim() == 1 && a_scale.size(0) == a.size(0),
              "fair::w4a4_gemm: a_scale must have shape [M] = [", a.size(0), "], got ",
              a_scale.sizes());
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf ||
                  out_dtype == at::kInt,
              "fair::w4a4_gemm: out_dtype must be float32, bfloat16, float16 or int32 (raw "
              "accumulator), got ", out_dtype);
  TORCH_CHECK(out_dtype != at::kInt || !bias.has_value(),
              "fair::w4a4_gemm: bias must be None when out_dtype is int32 (raw accumulator)");
  const c10::cuda::CUDAGuard guard(a.device());
  check_arch(op, a);
  Tensor out = at::empty({a.size(0), w.size(0)}, a.options().dtype(out_dtype));
  gemm_into(op, a, a_scale, w, w_scale, bias, out);
  return out;
}

Tensor w4a4_linear_cuda(const Tensor& x, const Tensor& w, const Tensor& w_scale,
                        const std::optional<Tensor>& bias, double act_clip) {
  const char* op = "w4a4_linear";
  check_cuda(op, x, "x");
  check_weight(op, x, w, w_scale, bias);
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "fair::w4a4_linear: x must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(x.dim() >= 1, "fair::w4a4_linear: x must have at least one dimension");
  const int64_t k = x.size(-1);
  TORCH_CHECK(k % 2 == 0, "fair::w4a4_linear: x's last dimension K must be even for int4 "
              "packing, got K=", k);
  TORCH_CHECK(k == 2 * w.size(1), "fair::w4a4_linear: x's last dimension K=", k,
              " must equal 2 * w.size(1) = ", 2 * w.size(1));
  TORCH_CHECK(std::isfinite(act_clip) && act_clip > 0.0,
              "fair::w4a4_linear: act_clip must be a finite number > 0, got ", act_clip);
  const c10::cuda::CUDAGuard guard(x.device());
  check_arch(op, x);
  const int64_t n = w.size(0);
  Tensor out = at::empty(with_last(x, n), x.options());
  const int64_t m = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  if (m == 0 || n == 0) return out;
  // One quantize kernel, then the GEMM: the only extra traffic is the packed int4 activation
  // (K/2 bytes + one fp32 scale per token). A row with inf/NaN gets a NaN scale, and a row whose
  // act_clip * absmax overflows fp32 an inf scale with codes 0, so its outputs are NaN either way
  // (raising, as the CPU op does, would need a device sync on every call).
  auto [packed, scale] = quantize_rows(op, x.contiguous().reshape({m, k}), act_clip);
  Tensor out2d = out.view({m, n});
  gemm_into(op, packed, scale, w, w_scale, bias, out2d);
  return out;
}

// Checks a, b [..., N, D] and w broadcastable to a.shape[:-1] (CPU wording); returns w as a
// contiguous tensor of shape a.shape[:-1] in the accumulation dtype (fp64 for fp64 input).
Tensor check_and_expand(const char* op, const Tensor& a, const Tensor& b, const Tensor& w) {
  check_cuda(op, a, "a");
  check_same_device(op, a, b, "b");
  check_same_device(op, a, w, "w");
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kHalf ||
                  a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kDouble,
              "fair::", op, ": a must be a floating tensor, got ", a.scalar_type());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), "fair::", op, ": b must have a's dtype ",
              a.scalar_type(), ", got ", b.scalar_type());
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), "fair::", op,
              ": w must be a floating tensor, got ", w.scalar_type());
  TORCH_CHECK(a.dim() >= 2, "fair::", op, ": a must be [..., N, D] (at least 2-D), got shape ",
              a.sizes());
  TORCH_CHECK(a.sizes() == b.sizes(), "fair::", op, ": a and b must have the same shape, got ",
              a.sizes(), " and ", b.sizes());
  const at::IntArrayRef lead = a.sizes().slice(0, a.dim() - 1);
  bool ok = w.dim() <= static_cast<int64_t>(lead.size());
  for (int64_t i = 1; ok && i <= w.dim(); ++i) {
    const int64_t ws = w.size(-i), ls = lead[lead.size() - i];
    ok = ws == ls || ws == 1;
  }
  TORCH_CHECK(ok, "fair::", op, ": w of shape ", w.sizes(), " must broadcast to a.shape[:-1] = ",
              lead);
  const at::ScalarType acc = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return w.to(acc).expand(lead).contiguous();
}

Tensor weighted_mse_cuda(const Tensor& a, const Tensor& b, const Tensor& w) {
  const char* op = "weighted_mse";
  const c10::cuda::CUDAGuard guard(a.device());
  const Tensor rw = check_and_expand(op, a, b, w);
  check_arch(op, a);
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
  const c10::cuda::CUDAGuard guard(a.device());
  const Tensor rw = check_and_expand(op, a, b, w);
  check_same_device(op, a, grad, "grad");
  TORCH_CHECK(grad.numel() == 1, "fair::weighted_mse_backward: grad must be a scalar, got shape ",
              grad.sizes());
  check_arch(op, a);
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
