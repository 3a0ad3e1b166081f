// int4 packing and per-row symmetric int4 quantization on CUDA.
//
// quantize_int4 is one kernel, one CTA per row: pass 1 reduces absmax (and a non-finite flag)
// over the row, the scale follows the contract of docs/kernels.md exactly (fp32, IEEE division, no
// reciprocal multiply, no fast-math), pass 2 re-reads the row (now in L1/L2), rounds half to even
// with __float2int_rn, clamps to [-8, 7] and writes packed bytes. Rows whose length is a multiple
// of 8 and whose base is 16-byte aligned use 8-element vector loads and 32-bit packed stores.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "launchers.h"

namespace fair_cuda {
namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(double v) { return __double2float_rn(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Load 8 consecutive elements as fp32 (the row base is 32-byte aligned on the vector path).
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 lo = reinterpret_cast<const float4*>(p)[0];
  const float4 hi = reinterpret_cast<const float4*>(p)[1];
  v[0] = lo.x; v[1] = lo.y; v[2] = lo.z; v[3] = lo.w;
  v[4] = hi.x; v[5] = hi.y; v[6] = hi.z; v[7] = hi.w;
}
__device__ __forceinline__ void load8(const double* p, float (&v)[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = __double2float_rn(p[i]);
}
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = to_float(e[i]);
}

// Round half to even, clamp to [-8, 7], keep the 4-bit two's-complement code.
__device__ __forceinline__ uint32_t quant_code(float v, float scale) {
  int q = __float2int_rn(__fdiv_rn(v, scale));
  q = q < -8 ? -8 : (q > 7 ? 7 : q);
  return static_cast<uint32_t>(q) & 0xFu;
}

// Block-wide max / or; blockDim.x is a multiple of 32 and at most 1024. max and or do not depend
// on the reduction order, so the result is deterministic.
__device__ __forceinline__ void block_reduce(float& m, int& bad) {
  __shared__ float s_max[32];
  __shared__ int s_bad[32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    bad |= __shfl_xor_sync(0xffffffffu, bad, off);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  if (lane == 0) {
    s_max[warp] = m;
    s_bad[warp] = bad;
  }
  __syncthreads();
  m = lane < nwarps ? s_max[lane] : 0.0f;
  bad = lane < nwarps ? s_bad[lane] : 0;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    bad |= __shfl_xor_sync(0xffffffffu, bad, off);
  }
}

template <typename T, bool kVec>
__global__ void quantize_int4_kernel(const T* __restrict__ x, int64_t k, float clip,
                                     uint8_t* __restrict__ packed, float* __restrict__ scale) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * k;
  uint8_t* pr = packed + row * (k / 2);

  float amax = 0.0f;
  int bad = 0;
  if (kVec) {
    for (int64_t g = threadIdx.x; g < k / 8; g += blockDim.x) {
      float v[8];
      load8(xr + g * 8, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        bad |= !isfinite(v[i]);
        amax = fmaxf(amax, fabsf(v[i]));
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      const float v = to_float(xr[i]);
      bad |= !isfinite(v);
      amax = fmaxf(amax, fabsf(v));
    }
  }
  block_reduce(amax, bad);

  float s;
  if (bad) {
    s = __int_as_float(0x7fc00000);  // NaN: the row is poisoned, codes are 0
  } else {
    s = __fdiv_rn(__fmul_rn(clip, amax), 7.0f);
    // All-zero rows, and rows so tiny that the scale underflows to 0, get scale 1 (codes 0).
    if (s == 0.0f) s = 1.0f;
  }
  if (threadIdx.x == 0) scale[row] = s;

  if (kVec) {
    for (int64_t g = threadIdx.x; g < k / 8; g += blockDim.x) {
      uint32_t word = 0;
      if (!bad) {
        float v[8];
        load8(xr + g * 8, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) word |= quant_code(v[i], s) << (4 * i);
      }
      reinterpret_cast<uint32_t*>(pr)[g] = word;
    }
  } else {
    for (int64_t j = threadIdx.x; j < k / 2; j += blockDim.x) {
      uint32_t byte = 0;
      if (!bad) byte = quant_code(to_float(xr[2 * j]), s) | (quant_code(to_float(xr[2 * j + 1]), s) << 4);
      pr[j] = static_cast<uint8_t>(byte);
    }
  }
}

template <typename T>
cudaError_t launch_quantize_typed(const T* x, int64_t rows, int64_t k, float clip,
                                  uint8_t* packed, float* scale, cudaStream_t stream) {
  // One CTA per row; enough threads to give each about 8 elements, 32..256.
  int threads = static_cast<int>(((k / 8 + 31) / 32) * 32);
  threads = threads < 32 ? 32 : (threads > 256 ? 256 : threads);
  const bool vec = (k % 8 == 0) && (reinterpret_cast<uintptr_t>(x) % 32 == 0) &&
                   (reinterpret_cast<uintptr_t>(packed) % 4 == 0);
  for (int64_t r0 = 0; r0 < rows; r0 += 2147483647LL) {  // grid.x limit
    const int64_t n = rows - r0 < 2147483647LL ? rows - r0 : 2147483647LL;
    if (vec)
      quantize_int4_kernel<T, true><<<static_cast<unsigned>(n), threads, 0, stream>>>(
          x + r0 * k, k, clip, packed + r0 * (k / 2), scale + r0);
    else
      quantize_int4_kernel<T, false><<<static_cast<unsigned>(n), threads, 0, stream>>>(
          x + r0 * k, k, clip, packed + r0 * (k / 2), scale + r0);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

__global__ void pack_int4_kernel(const int8_t* __restrict__ q, uint8_t* __restrict__ out,
                                 int64_t n_bytes) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n_bytes;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t lo = static_cast<uint32_t>(q[2 * j]) & 0xFu;
    const uint32_t hi = static_cast<uint32_t>(q[2 * j + 1]) & 0xFu;
    out[j] = static_cast<uint8_t>(lo | (hi << 4));
  }
}

__global__ void unpack_int4_kernel(const uint8_t* __restrict__ p, int8_t* __restrict__ out,
                                   int64_t n_bytes) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n_bytes;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int b = p[j];
    out[2 * j] = static_cast<int8_t>(((b & 15) ^ 8) - 8);
    out[2 * j + 1] = static_cast<int8_t>(((b >> 4) ^ 8) - 8);
  }
}

unsigned elementwise_grid(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65535 * 8 ? (blocks < 1 ? 1 : blocks) : 65535 * 8);
}

}  // namespace

cudaError_t launch_pack_int4(const int8_t* q, uint8_t* out, int64_t n_bytes, cudaStream_t stream) {
  if (n_bytes <= 0) return cudaSuccess;
  pack_int4_kernel<<<elementwise_grid(n_bytes, 256), 256, 0, stream>>>(q, out, n_bytes);
  return cudaGetLastError();
}

cudaError_t launch_unpack_int4(const uint8_t* p, int8_t* out, int64_t n_bytes,
                               cudaStream_t stream) {
  if (n_bytes <= 0) return cudaSuccess;
  unpack_int4_kernel<<<elementwise_grid(n_bytes, 256), 256, 0, stream>>>(p, out, n_bytes);
  return cudaGetLastError();
}

cudaError_t launch_quantize_int4(const void* x, DType x_dtype, int64_t rows, int64_t k, float clip,
                                 uint8_t* packed, float* scale, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (k < 0 || k % 2 != 0) return cudaErrorInvalidValue;
  switch (x_dtype) {
    case DType::kFloat32:
      return launch_quantize_typed(static_cast<const float*>(x), rows, k, clip, packed, scale,
                                   stream);
    case DType::kFloat16:
      return launch_quantize_typed(static_cast<const __half*>(x), rows, k, clip, packed, scale,
                                   stream);
    case DType::kBFloat16:
      return launch_quantize_typed(static_cast<const __nv_bfloat16*>(x), rows, k, clip, packed,
                                   scale, stream);
    case DType::kFloat64:  // rounded to fp32 first, as the CPU op does
      return launch_quantize_typed(static_cast<const double*>(x), rows, k, clip, packed, scale,
                                   stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace fair_cuda
