// Weighted MSE on CUDA: loss = sum_r w[r] * sum_d (a[r, d] - b[r, d])^2, and its backward.
//
// Forward is a fixed two-pass reduction: pass 1 splits the flat [rows * d] range into a number
// of contiguous chunks that depends only on (rows, d) (never on the GPU), each CTA reduces its
// chunk in a fixed tree; pass 2 (one CTA) reduces the chunk partials in a fixed order. No
// atomics, so the result is bitwise repeatable across runs and GPUs of any size. Accumulation is
// fp32 for fp32/fp16/bf16 input and fp64 for fp64 input (so gradcheck in float64 is meaningful).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace fair_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kElemsPerChunk = 16384;  // ~64 elements per thread per chunk
constexpr int64_t kMaxChunks = 1024;       // pass 2 reduces at most this many partials

template <typename Acc>
__device__ __forceinline__ Acc to_acc(float v) { return static_cast<Acc>(v); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(double v) { return static_cast<Acc>(v); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(__half v) { return static_cast<Acc>(__half2float(v)); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(__nv_bfloat16 v) {
  return static_cast<Acc>(__bfloat162float(v));
}

template <typename T>
__device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename T>
__device__ __forceinline__ T from_acc(double v) { return static_cast<T>(v); }

// Fixed-shape tree sum over the CTA (kThreads threads); result valid in thread 0.
template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v) {
  __shared__ Acc s[kThreads];
  s[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) s[threadIdx.x] += s[threadIdx.x + stride];
    __syncthreads();
  }
  return s[0];
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    wmse_partials_kernel(const T* __restrict__ a, const T* __restrict__ b,
                         const Acc* __restrict__ row_w, int64_t rows, int64_t d, int64_t chunk,
                         Acc* __restrict__ partials) {
  const int64_t total = rows * d;
  const int64_t start = blockIdx.x * chunk;
  const int64_t end = start + chunk < total ? start + chunk : total;
  Acc acc = 0;
  // Walk the rows that overlap [start, end); threads stride over each row's part.
  for (int64_t r = start / d; r < rows && r * d < end; ++r) {
    const int64_t lo = r * d > start ? r * d : start;
    const int64_t hi = (r + 1) * d < end ? (r + 1) * d : end;
    Acc row_acc = 0;
    for (int64_t e = lo + threadIdx.x; e < hi; e += kThreads) {
      const Acc diff = to_acc<Acc>(a[e]) - to_acc<Acc>(b[e]);
      row_acc += diff * diff;
    }
    acc += row_w[r] * row_acc;
  }
  const Acc total_sum = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = total_sum;
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    wmse_final_kernel(const Acc* __restrict__ partials, int64_t n, Acc* __restrict__ result) {
  Acc acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) acc += partials[i];
  const Acc s = block_sum(acc);
  if (threadIdx.x == 0) *result = s;
}

template <typename T, typename Acc>
__global__ void wmse_backward_kernel(const Acc* __restrict__ grad_out, const T* __restrict__ a,
                                     const T* __restrict__ b, const Acc* __restrict__ row_w,
                                     int64_t rows, int64_t d, T* __restrict__ grad_a,
                                     T* __restrict__ grad_b) {
  const Acc g2 = Acc(2) * grad_out[0];
  const int64_t total = rows * d;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Acc ga = g2 * row_w[e / d] * (to_acc<Acc>(a[e]) - to_acc<Acc>(b[e]));
    if (grad_a != nullptr) grad_a[e] = from_acc<T>(ga);
    if (grad_b != nullptr) grad_b[e] = from_acc<T>(-ga);
  }
}

template <typename T, typename Acc>
cudaError_t launch_forward(const T* a, const T* b, const Acc* row_w, int64_t rows, int64_t d,
                           Acc* partials, Acc* result, cudaStream_t stream) {
  const int64_t n = weighted_mse_num_partials(rows, d);
  const int64_t total = rows * d;
  const int64_t chunk = total > 0 ? (total + n - 1) / n : 1;
  wmse_partials_kernel<T, Acc><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
      a, b, row_w, rows, d, chunk, partials);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  wmse_final_kernel<Acc><<<1, kThreads, 0, stream>>>(partials, n, result);
  return cudaGetLastError();
}

template <typename T, typename Acc>
cudaError_t launch_backward(const Acc* grad_out, const T* a, const T* b, const Acc* row_w,
                            int64_t rows, int64_t d, T* grad_a, T* grad_b, cudaStream_t stream) {
  const int64_t total = rows * d;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + 255) / 256;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  wmse_backward_kernel<T, Acc><<<grid, 256, 0, stream>>>(grad_out, a, b, row_w, rows, d, grad_a,
                                                          grad_b);
  return cudaGetLastError();
}

}  // namespace

int64_t weighted_mse_num_partials(int64_t rows, int64_t d) {
  const int64_t total = rows * d;
  int64_t n = (total + kElemsPerChunk - 1) / kElemsPerChunk;
  if (n < 1) n = 1;
  if (n > kMaxChunks) n = kMaxChunks;
  return n;
}

cudaError_t launch_weighted_mse(const void* a, const void* b, const void* row_w, DType x_dtype,
                                int64_t rows, int64_t d, void* partials, void* result,
                                cudaStream_t stream) {
  if (rows < 0 || d < 0) return cudaErrorInvalidValue;
  if (d == 0) rows = 0;  // nothing to sum; still writes result = 0
  switch (x_dtype) {
    case DType::kFloat32:
      return launch_forward(static_cast<const float*>(a), static_cast<const float*>(b),
                            static_cast<const float*>(row_w), rows, d > 0 ? d : 1,
                            static_cast<float*>(partials), static_cast<float*>(result), stream);
    case DType::kFloat16:
      return launch_forward(static_cast<const __half*>(a), static_cast<const __half*>(b),
                            static_cast<const float*>(row_w), rows, d > 0 ? d : 1,
                            static_cast<float*>(partials), static_cast<float*>(result), stream);
    case DType::kBFloat16:
      return launch_forward(static_cast<const __nv_bfloat16*>(a),
                            static_cast<const __nv_bfloat16*>(b), static_cast<const float*>(row_w),
                            rows, d > 0 ? d : 1, static_cast<float*>(partials),
                            static_cast<float*>(result), stream);
    case DType::kFloat64:
      return launch_forward(static_cast<const double*>(a), static_cast<const double*>(b),
                            static_cast<const double*>(row_w), rows, d > 0 ? d : 1,
                            static_cast<double*>(partials), static_cast<double*>(result), stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch_weighted_mse_backward(const void* grad_out, const void* a, const void* b,
                                         const void* row_w, DType x_dtype, int64_t rows, int64_t d,
                                         void* grad_a, void* grad_b, cudaStream_t stream) {
  if (rows < 0 || d < 0) return cudaErrorInvalidValue;
  if (d == 0) return cudaSuccess;
  switch (x_dtype) {
    case DType::kFloat32:
      return launch_backward(static_cast<const float*>(grad_out), static_cast<const float*>(a),
                             static_cast<const float*>(b), static_cast<const float*>(row_w), rows,
                             d, static_cast<float*>(grad_a), static_cast<float*>(grad_b), stream);
    case DType::kFloat16:
      return launch_backward(static_cast<const float*>(grad_out), static_cast<const __half*>(a),
                             static_cast<const __half*>(b), static_cast<const float*>(row_w), rows,
                             d, static_cast<__half*>(grad_a), static_cast<__half*>(grad_b),
                             stream);
    case DType::kBFloat16:
      return launch_backward(static_cast<const float*>(grad_out),
                             static_cast<const __nv_bfloat16*>(a),
                             static_cast<const __nv_bfloat16*>(b), static_cast<const float*>(row_w),
                             rows, d, static_cast<__nv_bfloat16*>(grad_a),
                             static_cast<__nv_bfloat16*>(grad_b), stream);
    case DType::kFloat64:
      return launch_backward(static_cast<const double*>(grad_out), static_cast<const double*>(a),
                             static_cast<const double*>(b), static_cast<const double*>(row_w),
                             rows, d, static_cast<double*>(grad_a), static_cast<double*>(grad_b),
                             stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace fair_cuda
