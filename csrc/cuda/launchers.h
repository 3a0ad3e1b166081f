// Launcher API of the fair CUDA kernels.
//
// This header is deliberately plain C++ plus <cuda_runtime_api.h>: no torch, no CUTLASS. The
// kernels (*.cu in this folder) implement it with raw pointers, sizes and a cudaStream_t, so they
// compile with nvcc alone (CI compiles them for every arch without a CUDA build of torch), and the
// thin torch glue (ops_cuda.cpp) is the only file that needs torch's CUDA headers. Keeping the
// boundary at raw pointers also makes a later port to torch's stable ABI mechanical.
//
// Every launcher enqueues work on `stream` and returns the launch status (cudaSuccess or the
// error from the launch); none of them synchronises.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fair_cuda {

// Element types crossing the launcher boundary.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3, kInt32 = 4 };

// ---- int4 packing --------------------------------------------------------------------------
// Layout (identical on every backend): int4 matrix [R, K] <-> uint8 [R, K/2], K contiguous,
// byte j = (q[2j] & 0xF) | (q[2j+1] & 0xF) << 4 (even column in the low nibble), two's complement.

// q: int8 [n_bytes * 2] contiguous (values assumed in [-8, 7]; higher bits are dropped),
// out: uint8 [n_bytes].
cudaError_t launch_pack_int4(const int8_t* q, uint8_t* out, int64_t n_bytes, cudaStream_t stream);
// p: uint8 [n_bytes], out: int8 [n_bytes * 2].
cudaError_t launch_unpack_int4(const uint8_t* p, int8_t* out, int64_t n_bytes, cudaStream_t stream);

// ---- per-row symmetric int4 quantization ---------------------------------------------------
// x: [rows, k] contiguous, dtype in {kFloat32, kFloat16, kBFloat16, kFloat64 (rounded to fp32
// first, like the CPU op)}, k even.
// scale[r] = clip * absmax_r / 7 (IEEE fp32 division), 1 where that is 0 (all-zero or
// underflowing row);
// q = clamp(round_half_even(float(x) / scale[r]), -8, 7), packed into packed[r, k/2].
// A row holding inf or NaN gets scale NaN and all-zero codes (the CUDA kernel cannot raise
// without a device sync, so non-finite input poisons the row's output instead of hiding).
cudaError_t launch_quantize_int4(const void* x, DType x_dtype, int64_t rows, int64_t k, float clip,
                                 uint8_t* packed, float* scale, cudaStream_t stream);

// ---- W4A4 GEMM -------------------------------------------------------------------------------
// out[m, n] = (float(acc[m, n]) * a_scale[m]) * w_scale[n] (+ bias[n]), acc = sum_k qa[m,k] qw[n,k]
// in int32 (exact). a: uint8 [m, k/2], w: uint8 [n, k/2] (both packed int4, K contiguous),
// a_scale fp32 [m], w_scale fp32 [n], bias fp32 [n] or nullptr, out [m, n] of out_dtype in
// {kFloat32, kFloat16, kBFloat16, kInt32}; kInt32 stores the raw accumulator (scales and bias
// are ignored and may be nullptr).
enum class GemmPath : int {
  kAuto = 0,  // choose by compute capability (major 8 -> int4, major >= 9 -> int8)
  kInt4 = 1,  // tensor cores, mma.sync m16n8k64 .s4 (native on sm_80/86/89)
  kInt8 = 2,  // tensor cores, s4 -> s8 unpack in registers, mma.sync m16n8k32 .s8 (sm_90 path)
  kSimt = 3,  // plain CUDA cores; any even k and any alignment (correctness fallback)
};

// Which path launch_w4a4_gemm takes for these arguments on `device`. `requested` comes from the
// environment when kAuto: FAIR_CUDA_FORCE_INT8=1 forces kInt8, FAIR_CUDA_GEMM_PATH in
// {int4, int8, simt} forces that path. Tensor-core paths need k % 32 == 0 and 16-byte aligned
// a / w; otherwise kSimt is used.
GemmPath select_gemm_path(int device, int64_t k, const void* a, const void* w, GemmPath requested);
const char* gemm_path_name(GemmPath path);

// Compute capability (major * 10 + minor) of `device`, or -1 on error. Cached per device.
int device_capability(int device);

// Whether this binary holds kernels for `device` (sm_80 or newer). False -> the launchers return
// cudaErrorNoKernelImageForDevice; the glue turns that into a clear error naming the arch.
bool device_supported(int device);

cudaError_t launch_w4a4_gemm(const uint8_t* a, const float* a_scale, const uint8_t* w,
                             const float* w_scale, const float* bias, void* out, DType out_dtype,
                             int64_t m, int64_t n, int64_t k, int device, GemmPath path,
                             cudaStream_t stream);

// ---- weighted MSE ---------------------------------------------------------------------------
// loss = sum_r row_w[r] * sum_d (a[r, d] - b[r, d])^2 over a, b [rows, d] contiguous of x_dtype in
// {kFloat32, kFloat16, kBFloat16, kFloat64}. Accumulation is fp32 (fp64 for kFloat64 input);
// row_w and the result use that accumulation type. Deterministic: a fixed two-pass tree
// reduction whose partition depends only on (rows, d), no atomics, so repeated calls agree
// bit for bit.
// `partials` is scratch of weighted_mse_num_partials(rows, d) accumulation-type elements.
int64_t weighted_mse_num_partials(int64_t rows, int64_t d);
cudaError_t launch_weighted_mse(const void* a, const void* b, const void* row_w, DType x_dtype,
                                int64_t rows, int64_t d, void* partials, void* result,
                                cudaStream_t stream);
// grad_a = 2 * row_w[r] * (a - b) * grad_out[0], grad_b = -grad_a, both of x_dtype;
// grad_out and row_w in the accumulation type. Either output pointer may be nullptr.
cudaError_t launch_weighted_mse_backward(const void* grad_out, const void* a, const void* b,
                                         const void* row_w, DType x_dtype, int64_t rows, int64_t d,
                                         void* grad_a, void* grad_b, cudaStream_t stream);

}  // namespace fair_cuda
