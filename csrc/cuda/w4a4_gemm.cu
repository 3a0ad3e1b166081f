// W4A4 GEMM on tensor cores: packed int4 A [M, K/2] x packed int4 W [N, K/2]^T -> int32
// accumulators -> fused epilogue (acc * a_scale[m]) * w_scale[n] (+ bias[n]) -> fp32/fp16/bf16.
//
// One kernel template serves both tensor-core paths:
//   int4 path (sm_80/86/89): mma.sync m16n8k64 .s4, native IMMA.16864 on these chips.
//   int8 path (sm_90, or forced): the same packed int4 tiles in shared memory; each 32-bit
//     fragment word (8 s4 values) is sign-extended in registers to two words of s8 and fed to
//     mma.sync m16n8k32 .s8 (Hopper has no int4 MMA; ptxas would emulate s4 MMAs slowly).
// The int32 accumulation is exact either way (|acc| <= 64 K), so both paths give identical bits.
//
// Data flow per CTA (BM x BN output tile): a STAGES-deep cp.async pipeline streams BKB-byte K
// slices of A and W into shared memory (16-byte chunks XOR-swizzled so that ldmatrix and the
// cp.async stores are bank-conflict free), ldmatrix.x4 loads MMA fragments, and the epilogue
// scales the accumulators straight from registers: no int32 M x N tensor ever reaches memory.
// Rows past M / N and K chunks past K are zero-filled by cp.async (src-size 0), so any M, N and
// any K % 32 == 0 work. Other K (or unaligned pointers) take the SIMT fallback at the end.
//
// Why the int8 path can reuse the int4 smem tiles unchanged: a k32 s8 MMA wants, per lane, row g
// bytes 4t..4t+3 (k 4t..4t+3) and bytes 16+4t.. (k 16+4t..). We instead feed it the 8 s4 values
// of packed word t (k 8t..8t+7) split into low and high halves, for A and for W alike. That is
// the same permutation of k on both operands, and a dot product does not care about k order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "launchers.h"
#include "ptx.cuh"

namespace fair_cuda {
namespace {

// BM x BN CTA tile, BKB bytes (= 2*BKB int4 values) of K per pipeline stage, WM x WN warps.
template <int BM_, int BN_, int BKB_, int WM_, int WN_, int STAGES_>
struct TileConfig {
  static constexpr int BM = BM_, BN = BN_, BKB = BKB_, WM = WM_, WN = WN_, STAGES = STAGES_;
  static constexpr int THREADS = WM * WN * 32;
  static constexpr int WTM = BM / WM, WTN = BN / WN;  // warp tile
  static constexpr int MT = WTM / 16, NT = WTN / 8;   // MMA tiles per warp
  static constexpr int CPR = BKB / 16;                // 16-byte chunks per smem row
  static constexpr int KSTEPS = BKB / 32;             // 32-byte MMA k-steps per stage
  static constexpr int A_STAGE = BM * BKB, B_STAGE = BN * BKB;
  static constexpr int SMEM_BYTES = STAGES * (A_STAGE + B_STAGE);
  static_assert(WTM % 16 == 0 && WTN % 16 == 0, "warp tile: 16-row A tiles, pairs of 8-col B tiles");
  static_assert(CPR == 2 || CPR == 4 || CPR == 8, "BKB must be 32, 64 or 128 bytes");
  static_assert(STAGES >= 2, "the pipeline needs at least two stages");
};

// Tile choice by M (torchao's s4s4 table as a starting point; small M keeps one 16-row tile
// and spreads N over more CTAs because decode-size GEMMs are bound by streaming W).
using CfgSmall = TileConfig<16, 64, 128, 1, 2, 4>;    // M <= 16
using CfgMedium = TileConfig<64, 128, 64, 2, 2, 4>;   // M <= 64
using CfgLarge = TileConfig<128, 128, 64, 2, 2, 4>;   // M <= 512
using CfgHuge = TileConfig<128, 256, 64, 2, 4, 3>;    // M > 512

// Physical 16-byte chunk of logical chunk c in smem row r. Rows are BKB bytes; the XOR spreads
// the 8 rows an ldmatrix phase reads (same logical chunk) over all 32 banks.
template <int CPR>
__device__ __forceinline__ int swizzle(int r, int c) {
  return c ^ ((r / (8 / CPR)) % CPR);
}

__device__ __forceinline__ float acc_to_float(int32_t acc, float as, float ws, const float* bias,
                                              int col) {
  // Fixed order and explicit roundings (no FMA contraction): ((acc * as) * ws) + bias, as on CPU.
  float y = __fmul_rn(__fmul_rn(__int2float_rn(acc), as), ws);
  if (bias != nullptr) y = __fadd_rn(y, bias[col]);
  return y;
}

__device__ __forceinline__ void store_out(void* out, DType dt, int64_t idx, int32_t acc, float as,
                                          float ws, const float* bias, int col) {
  switch (dt) {
    case DType::kInt32:
      static_cast<int32_t*>(out)[idx] = acc;
      break;
    case DType::kFloat16:
      static_cast<__half*>(out)[idx] = __float2half_rn(acc_to_float(acc, as, ws, bias, col));
      break;
    case DType::kBFloat16:
      static_cast<__nv_bfloat16*>(out)[idx] =
          __float2bfloat16_rn(acc_to_float(acc, as, ws, bias, col));
      break;
    default:
      static_cast<float*>(out)[idx] = acc_to_float(acc, as, ws, bias, col);
      break;
  }
}

template <class Cfg, bool kInt8>
__global__ void __launch_bounds__(Cfg::THREADS)
    w4a4_gemm_tc_kernel(const uint8_t* __restrict__ a, const float* __restrict__ a_scale,
                        const uint8_t* __restrict__ w, const float* __restrict__ w_scale,
                        const float* __restrict__ bias, void* __restrict__ out, DType out_dtype,
                        int M, int N, int64_t Kb) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // sm_90+ has no int4 MMA (ptxas emulates it with ~200 instructions); both instantiations use
  // the s8 MMA there, which gives the same exact accumulators.
#if __CUDA_ARCH__ >= 900
  constexpr bool kUseS8 = true;
#else
  constexpr bool kUseS8 = kInt8;
#endif
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BKB = Cfg::BKB, CPR = Cfg::CPR, STAGES = Cfg::STAGES;
  constexpr int MT = Cfg::MT, NT = Cfg::NT;
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* sA = smem;
  uint8_t* sB = smem + STAGES * Cfg::A_STAGE;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / Cfg::WN, wn = warp % Cfg::WN;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int KT = static_cast<int>((Kb + BKB - 1) / BKB);

  auto load_stage = [&](int stage, int kt) {
    const int64_t kb0 = static_cast<int64_t>(kt) * BKB;
    const uint32_t sa = ptx::smem_addr(sA + stage * Cfg::A_STAGE);
    const uint32_t sb = ptx::smem_addr(sB + stage * Cfg::B_STAGE);
#pragma unroll
    for (int i = tid; i < BM * CPR; i += Cfg::THREADS) {
      const int r = i / CPR, c = i % CPR;
      const int64_t gk = kb0 + c * 16;
      const bool ok = (m0 + r < M) && (gk < Kb);
      const uint8_t* src = ok ? a + static_cast<int64_t>(m0 + r) * Kb + gk : a;
      ptx::cp_async_16(sa + r * BKB + swizzle<CPR>(r, c) * 16, src, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = tid; i < BN * CPR; i += Cfg::THREADS) {
      const int r = i / CPR, c = i % CPR;
      const int64_t gk = kb0 + c * 16;
      const bool ok = (n0 + r < N) && (gk < Kb);
      const uint8_t* src = ok ? w + static_cast<int64_t>(n0 + r) * Kb + gk : w;
      ptx::cp_async_16(sb + r * BKB + swizzle<CPR>(r, c) * 16, src, ok ? 16 : 0);
    }
  };

  int32_t acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

  // Prologue: STAGES-1 slices in flight. Every iteration commits exactly one group (possibly
  // empty), so wait_group<STAGES-2> below always means "slice kt has landed".
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_stage(s, s);
    ptx::cp_async_commit();
  }

  for (int kt = 0; kt < KT; ++kt) {
    ptx::cp_async_wait<STAGES - 2>();
    // Also guarantees every warp is done reading the stage that the prefetch below overwrites
    // (it was consumed in iteration kt-1).
    __syncthreads();
    const int pf = kt + STAGES - 1;
    if (pf < KT) load_stage(pf % STAGES, pf);
    ptx::cp_async_commit();

    const int stage = kt % STAGES;
    const uint8_t* As = sA + stage * Cfg::A_STAGE;
    const uint8_t* Bs = sB + stage * Cfg::B_STAGE;
#pragma unroll
    for (int ks = 0; ks < Cfg::KSTEPS; ++ks) {
      // A fragments: matrices (rows 0-7, chunk 2ks), (rows 8-15, 2ks), (rows 0-7, 2ks+1),
      // (rows 8-15, 2ks+1) = a[0..3] of the MMA layout (see ptx.cuh).
      uint32_t af[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int r = wm * Cfg::WTM + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int c = 2 * ks + (lane >> 4);
        ptx::ldmatrix_x4(af[mt], ptx::smem_addr(As + r * BKB + swizzle<CPR>(r, c) * 16));
      }
      // s8 operands of the two k32 halves: half h uses packed words a[h*2] (row g) and
      // a[h*2+1] (row g+8); low/high 4 values of each word become k-parts 1 and 2.
      uint32_t a8[kUseS8 ? MT : 1][2][4];
      if constexpr (kUseS8) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            ptx::s4x8_to_s8x8(af[mt][2 * h], a8[mt][h][0], a8[mt][h][2]);
            ptx::s4x8_to_s8x8(af[mt][2 * h + 1], a8[mt][h][1], a8[mt][h][3]);
          }
      }
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        // B fragments of two 8-column tiles: matrices (n 0-7, chunk 2ks), (n 0-7, 2ks+1),
        // (n 8-15, 2ks), (n 8-15, 2ks+1).
        uint32_t bq[4];
        const int r = wn * Cfg::WTN + np * 16 + (lane & 7) + (lane >> 4) * 8;
        const int c = 2 * ks + ((lane >> 3) & 1);
        ptx::ldmatrix_x4(bq, ptx::smem_addr(Bs + r * BKB + swizzle<CPR>(r, c) * 16));
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const uint32_t b[2] = {bq[2 * j], bq[2 * j + 1]};
          if constexpr (kUseS8) {
            uint32_t b8[2][2];
            ptx::s4x8_to_s8x8(b[0], b8[0][0], b8[0][1]);
            ptx::s4x8_to_s8x8(b[1], b8[1][0], b8[1][1]);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              ptx::mma_s8(acc[mt][2 * np + j], a8[mt][0], b8[0]);
              ptx::mma_s8(acc[mt][2 * np + j], a8[mt][1], b8[1]);
            }
          } else {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) ptx::mma_s4(acc[mt][2 * np + j], af[mt], b);
          }
        }
      }
    }
  }
  ptx::cp_async_wait<0>();  // no copy may still target smem when the CTA exits

  // Epilogue straight from the accumulator fragments: c[0], c[1] -> row g, cols 2t, 2t+1;
  // c[2], c[3] -> row g+8.
  const int g = lane >> 2, t = lane & 3;
  const bool raw = out_dtype == DType::kInt32;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + wm * Cfg::WTM + mt * 16 + g + 8 * h;
      if (row >= M) continue;
      const float as = raw ? 1.0f : a_scale[row];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int col = n0 + wn * Cfg::WTN + nt * 8 + 2 * t;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (col + e < N) {
            const float ws = raw ? 1.0f : w_scale[col + e];
            store_out(out, out_dtype, static_cast<int64_t>(row) * N + col + e, acc[mt][nt][2 * h + e],
                      as, ws, bias, col + e);
          }
        }
      }
    }
  }
#endif  // __CUDA_ARCH__ >= 800
}

// Correctness fallback on CUDA cores: one thread per output, any even K, any alignment.
__global__ void w4a4_gemm_simt_kernel(const uint8_t* __restrict__ a,
                                      const float* __restrict__ a_scale,
                                      const uint8_t* __restrict__ w,
                                      const float* __restrict__ w_scale,
                                      const float* __restrict__ bias, void* __restrict__ out,
                                      DType out_dtype, int M, int N, int64_t Kb) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const uint8_t* wr = w + static_cast<int64_t>(n) * Kb;
  const bool raw = out_dtype == DType::kInt32;
  for (int m = blockIdx.y * blockDim.y + threadIdx.y; m < M; m += gridDim.y * blockDim.y) {
    const uint8_t* ar = a + static_cast<int64_t>(m) * Kb;
    int32_t acc = 0;
    for (int64_t kb = 0; kb < Kb; ++kb) {
      const int x = ar[kb], y = wr[kb];
      const int xl = ((x & 15) ^ 8) - 8, xh = ((x >> 4) ^ 8) - 8;
      const int yl = ((y & 15) ^ 8) - 8, yh = ((y >> 4) ^ 8) - 8;
      acc += xl * yl + xh * yh;
    }
    store_out(out, out_dtype, static_cast<int64_t>(m) * N + n, acc, raw ? 1.0f : a_scale[m],
              raw ? 1.0f : w_scale[n], bias, n);
  }
}

constexpr int kMaxDevices = 64;

template <class Cfg, bool kInt8>
cudaError_t launch_tc(const uint8_t* a, const float* a_scale, const uint8_t* w,
                      const float* w_scale, const float* bias, void* out, DType out_dtype,
                      int64_t M, int64_t N, int64_t K, int device, cudaStream_t stream) {
  auto kernel = w4a4_gemm_tc_kernel<Cfg, kInt8>;
  if (Cfg::SMEM_BYTES > 48 * 1024) {
    // Opt in to > 48 KiB of dynamic shared memory once per (kernel, device).
    static std::atomic<uint64_t> done{0};
    const uint64_t bit = uint64_t{1} << (device % kMaxDevices);
    if ((done.load(std::memory_order_relaxed) & bit) == 0) {
      const cudaError_t e = cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::SMEM_BYTES);
      if (e != cudaSuccess) return e;
      done.fetch_or(bit, std::memory_order_relaxed);
    }
  }
  const dim3 grid(static_cast<unsigned>((N + Cfg::BN - 1) / Cfg::BN),
                  static_cast<unsigned>((M + Cfg::BM - 1) / Cfg::BM));
  if (grid.y > 65535u) return cudaErrorInvalidConfiguration;
  kernel<<<grid, Cfg::THREADS, Cfg::SMEM_BYTES, stream>>>(
      a, a_scale, w, w_scale, bias, out, out_dtype, static_cast<int>(M), static_cast<int>(N),
      K / 2);
  return cudaGetLastError();
}

template <bool kInt8>
cudaError_t launch_tc_by_m(const uint8_t* a, const float* a_scale, const uint8_t* w,
                           const float* w_scale, const float* bias, void* out, DType out_dtype,
                           int64_t M, int64_t N, int64_t K, int device, cudaStream_t stream) {
  if (M <= 16)
    return launch_tc<CfgSmall, kInt8>(a, a_scale, w, w_scale, bias, out, out_dtype, M, N, K,
                                      device, stream);
  if (M <= 64)
    return launch_tc<CfgMedium, kInt8>(a, a_scale, w, w_scale, bias, out, out_dtype, M, N, K,
                                       device, stream);
  if (M <= 512)
    return launch_tc<CfgLarge, kInt8>(a, a_scale, w, w_scale, bias, out, out_dtype, M, N, K,
                                      device, stream);
  return launch_tc<CfgHuge, kInt8>(a, a_scale, w, w_scale, bias, out, out_dtype, M, N, K, device,
                                   stream);
}

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

}  // namespace

int device_capability(int device) {
  static std::atomic<int> cache[kMaxDevices];  // 0 = not yet queried
  if (device < 0) return -1;
  if (device < kMaxDevices) {
    const int c = cache[device].load(std::memory_order_relaxed);
    if (c != 0) return c;
  }
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();  // clear the non-sticky error for the caller
    return -1;
  }
  const int cap = major * 10 + minor;
  if (device < kMaxDevices) cache[device].store(cap, std::memory_order_relaxed);
  return cap;
}

bool device_supported(int device) { return device_capability(device) >= 80; }

const char* gemm_path_name(GemmPath path) {
  switch (path) {
    case GemmPath::kInt4: return "int4";
    case GemmPath::kInt8: return "int8";
    case GemmPath::kSimt: return "simt";
    default: return "auto";
  }
}

GemmPath select_gemm_path(int device, int64_t k, const void* a, const void* w,
                          GemmPath requested) {
  GemmPath p = requested;
  if (p == GemmPath::kAuto) {
    const char* forced = std::getenv("FAIR_CUDA_GEMM_PATH");
    if (forced != nullptr && std::strcmp(forced, "int4") == 0) p = GemmPath::kInt4;
    else if (forced != nullptr && std::strcmp(forced, "int8") == 0) p = GemmPath::kInt8;
    else if (forced != nullptr && std::strcmp(forced, "simt") == 0) p = GemmPath::kSimt;
    else if (env_flag("FAIR_CUDA_FORCE_INT8")) p = GemmPath::kInt8;
  }
  const int cap = device_capability(device);
  if (p == GemmPath::kAuto) p = cap >= 90 ? GemmPath::kInt8 : GemmPath::kInt4;
  // No int4 MMA on sm_90+: the kernel compiles its s4 variant to s8 MMAs there anyway.
  if (p == GemmPath::kInt4 && cap >= 90) p = GemmPath::kInt8;
  const bool aligned = (reinterpret_cast<uintptr_t>(a) % 16 == 0) &&
                       (reinterpret_cast<uintptr_t>(w) % 16 == 0);
  if (p != GemmPath::kSimt && (k % 32 != 0 || !aligned)) p = GemmPath::kSimt;
  return p;
}

cudaError_t launch_w4a4_gemm(const uint8_t* a, const float* a_scale, const uint8_t* w,
                             const float* w_scale, const float* bias, void* out, DType out_dtype,
                             int64_t m, int64_t n, int64_t k, int device, GemmPath path,
                             cudaStream_t stream) {
  if (m <= 0 || n <= 0) return cudaSuccess;
  if (k < 0 || k % 2 != 0 || n > INT32_MAX || m > INT32_MAX) return cudaErrorInvalidValue;
  if (!device_supported(device)) return cudaErrorNoKernelImageForDevice;
  if (out_dtype != DType::kFloat32 && out_dtype != DType::kFloat16 &&
      out_dtype != DType::kBFloat16 && out_dtype != DType::kInt32)
    return cudaErrorInvalidValue;
  switch (select_gemm_path(device, k, a, w, path)) {
    case GemmPath::kInt4:
      return launch_tc_by_m<false>(a, a_scale, w, w_scale, bias, out, out_dtype, m, n, k, device,
                                   stream);
    case GemmPath::kInt8:
      return launch_tc_by_m<true>(a, a_scale, w, w_scale, bias, out, out_dtype, m, n, k, device,
                                  stream);
    default: {
      const dim3 block(32, 8);
      const dim3 grid(static_cast<unsigned>((n + 31) / 32),
                      static_cast<unsigned>(std::min<int64_t>((m + 7) / 8, 65535)));
      w4a4_gemm_simt_kernel<<<grid, block, 0, stream>>>(a, a_scale, w, w_scale, bias, out,
                                                        out_dtype, static_cast<int>(m),
                                                        static_cast<int>(n), k / 2);
      return cudaGetLastError();
    }
  }
}

}  // namespace fair_cuda
