// Declarations of every `fair` op implementation. Schemas live in csrc/torch_bindings.cpp
// (TORCH_LIBRARY(fair, m)); CPU implementations in csrc/cpu/, registered there too. CUDA
// implementations (csrc/cuda/, built by cmake/cuda.cmake) register themselves with
// TORCH_LIBRARY_IMPL(fair, CUDA, m) and take the same arguments.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fair {

// int8 [..., K] in [-8, 7], K even -> uint8 [..., K/2]; byte j = (q[2j] & 15) | (q[2j+1] << 4).
at::Tensor pack_int4_cpu(const at::Tensor& q);
// uint8 [..., K/2] -> int8 [..., K] (two's-complement nibbles, low nibble = even column).
at::Tensor unpack_int4_cpu(const at::Tensor& packed);
// float [..., K] -> (uint8 [..., K/2], fp32 scale [...]); symmetric per row, see docs/kernels.md.
std::tuple<at::Tensor, at::Tensor> quantize_int4_cpu(const at::Tensor& x, double clip);
// public packed w [N, K/2] -> the CPU kernels' prepacked int4 layout, uint8 [ceil(N/64), Kp/4,
// 128] (Kp = K rounded up to 64; layout in csrc/cpu/isa.h), made once per weight.
at::Tensor prepack_int4_cpu(const at::Tensor& w);
// (a [M, K/2] x w [N, K/2]^T in int32) * a_scale[m] * w_scale[n] (+ bias[n]) -> [M, N] out_dtype.
// out_dtype int32 returns the exact accumulator (no scales, no bias).
at::Tensor w4a4_gemm_cpu(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                         const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                         at::ScalarType out_dtype);
// x [..., K] float -> per-token int4 quantization fused with w4a4_gemm -> [..., N] x.dtype.
at::Tensor w4a4_linear_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                           const std::optional<at::Tensor>& bias, double act_clip);
// w4a4_linear on prepacked weights (prepack_int4_cpu); N = w_scale.size(0).
at::Tensor w4a4_linear_prepacked_cpu(const at::Tensor& x, const at::Tensor& w_prepacked,
                                     const at::Tensor& w_scale,
                                     const std::optional<at::Tensor>& bias, double act_clip);
// sum_i w_i * ||a_i - b_i||^2 over positions i of a, b [..., N, D]; w broadcasts to [..., N].
at::Tensor weighted_mse_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& w);
// (grad_a, grad_b) = (2 w_i (a_i - b_i) g, -grad_a) for a scalar upstream gradient g.
std::tuple<at::Tensor, at::Tensor> weighted_mse_backward_cpu(const at::Tensor& grad,
                                                             const at::Tensor& a,
                                                             const at::Tensor& b,
                                                             const at::Tensor& w);

}  // namespace fair
