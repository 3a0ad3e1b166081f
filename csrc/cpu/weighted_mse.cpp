// CPU ops weighted_mse and weighted_mse_backward.
//
// Deterministic: per-position sums run in a fixed order, positions are grouped in fixed chunks
// (independent of the thread count) and the chunk partials are added sequentially. Accumulation
// is in float64 on CPU (cheap here, and exact enough for float64 gradcheck).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>

#include <vector>

#include "cpu/common.h"
#include "ops.h"

namespace fair {
using namespace fair::cpu;

namespace {

constexpr int64_t kChunk = 256;  // positions per partial sum

// Checks a, b [..., N, D] and w broadcastable to a.shape[:-1]; returns w as a contiguous float64
// tensor of shape a.shape[:-1].
at::Tensor check_and_expand(const char* op, const at::Tensor& a, const at::Tensor& b,
                            const at::Tensor& w) {
  check_cpu(op, "a", a);
  check_cpu(op, "b", b);
  check_cpu(op, "w", w);
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), "fair::", op,
              ": a must be a floating tensor, got ", a.scalar_type());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), "fair::", op,
              ": b must have a's dtype ", a.scalar_type(), ", got ", b.scalar_type());
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), "fair::", op,
              ": w must be a floating tensor, got ", w.scalar_type());
  TORCH_CHECK(a.dim() >= 2, "fair::", op, ": a must be [..., N, D] (at least 2-D), got shape ",
              a.sizes());
  TORCH_CHECK(a.sizes() == b.sizes(), "fair::", op, ": a and b must have the same shape, got ",
              a.sizes(), " and ", b.sizes());
  const auto lead = a.sizes().slice(0, a.dim() - 1);
  bool ok = w.dim() <= int64_t(lead.size());
  for (int64_t i = 1; ok && i <= w.dim(); ++i) {
    const int64_t ws = w.size(-i), ls = lead[lead.size() - i];
    ok = ws == ls || ws == 1;
  }
  TORCH_CHECK(ok, "fair::", op, ": w of shape ", w.sizes(),
              " must broadcast to a.shape[:-1] = ", lead);
  return w.to(at::kDouble).expand(lead).contiguous();
}

template <typename T>
double weighted_sum(const T* a, const T* b, const double* w, int64_t P, int64_t D) {
  const int64_t chunks = ceil_div(P, kChunk);
  std::vector<double> partial(size_t(chunks), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double acc = 0.0;
      for (int64_t i = c * kChunk; i < std::min(P, (c + 1) * kChunk); ++i) {
        double s = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          const double diff = double(a[i * D + d]) - double(b[i * D + d]);
          s += diff * diff;
        }
        acc += w[i] * s;
      }
      partial[size_t(c)] = acc;
    }
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

template <typename T>
void weighted_grad(const T* a, const T* b, const double* w, double g, int64_t P, int64_t D,
                   T* ga, T* gb) {
  at::parallel_for(0, P, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double f = 2.0 * w[i] * g;
      for (int64_t d = 0; d < D; ++d) {
        const double v = f * (double(a[i * D + d]) - double(b[i * D + d]));
        ga[i * D + d] = T(v);
        gb[i * D + d] = T(-v);
      }
    }
  });
}

}  // namespace

at::Tensor weighted_mse_cpu(const at::Tensor& a_in, const at::Tensor& b_in,
                            const at::Tensor& w_in) {
  const at::Tensor w = check_and_expand("weighted_mse", a_in, b_in, w_in);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t D = a.size(-1), P = w.numel();
  const double* wp = w.const_data_ptr<double>();
  double total = 0.0;
  if (D > 0 && P > 0) {
    switch (a.scalar_type()) {
      case at::kFloat:
        total = weighted_sum(a.const_data_ptr<float>(), b.const_data_ptr<float>(), wp, P, D);
        break;
      case at::kDouble:
        total = weighted_sum(a.const_data_ptr<double>(), b.const_data_ptr<double>(), wp, P, D);
        break;
      case at::kBFloat16:
        total = weighted_sum(a.const_data_ptr<c10::BFloat16>(),
                             b.const_data_ptr<c10::BFloat16>(), wp, P, D);
        break;
      case at::kHalf:
        total = weighted_sum(a.const_data_ptr<c10::Half>(), b.const_data_ptr<c10::Half>(), wp, P,
                             D);
        break;
      default: TORCH_CHECK(false, "fair::weighted_mse: unsupported dtype ", a.scalar_type());
    }
  }
  // Through a float64 tensor: the cast to a's dtype rounds an out-of-range sum to inf, as torch's
  // own reductions do (a scalar_tensor of a's dtype would refuse it with an overflow error).
  return at::scalar_tensor(total, a.options().dtype(at::kDouble)).to(a.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> weighted_mse_backward_cpu(const at::Tensor& grad,
                                                             const at::Tensor& a_in,
                                                             const at::Tensor& b_in,
                                                             const at::Tensor& w_in) {
  const at::Tensor w = check_and_expand("weighted_mse_backward", a_in, b_in, w_in);
  check_cpu("weighted_mse_backward", "grad", grad);
  TORCH_CHECK(grad.numel() == 1, "fair::weighted_mse_backward: grad must be a scalar, got shape ",
              grad.sizes());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  at::Tensor ga = at::empty(a.sizes(), a.options()), gb = at::empty(a.sizes(), a.options());
  const int64_t D = a.size(-1), P = w.numel();
  const double g = grad.item<double>();
  const double* wp = w.const_data_ptr<double>();
  if (D > 0 && P > 0) {
    switch (a.scalar_type()) {
      case at::kFloat:
        weighted_grad(a.const_data_ptr<float>(), b.const_data_ptr<float>(), wp, g, P, D,
                      ga.data_ptr<float>(), gb.data_ptr<float>());
        break;
      case at::kDouble:
        weighted_grad(a.const_data_ptr<double>(), b.const_data_ptr<double>(), wp, g, P, D,
                      ga.data_ptr<double>(), gb.data_ptr<double>());
        break;
      case at::kBFloat16:
        weighted_grad(a.const_data_ptr<c10::BFloat16>(), b.const_data_ptr<c10::BFloat16>(), wp,
                      g, P, D, ga.data_ptr<c10::BFloat16>(), gb.data_ptr<c10::BFloat16>());
        break;
      case at::kHalf:
        weighted_grad(a.const_data_ptr<c10::Half>(), b.const_data_ptr<c10::Half>(), wp, g, P, D,
                      ga.data_ptr<c10::Half>(), gb.data_ptr<c10::Half>());
        break;
      default: TORCH_CHECK(false, "fair::weighted_mse_backward: unsupported dtype ",
                           a.scalar_type());
    }
  }
  return {ga, gb};
}

}  // namespace fair
