// Small device helpers shared by the fair CUDA kernels: cp.async, ldmatrix, int MMA, s4 -> s8.
// Hand-written PTX (no CUTLASS) keeps every .cu file compilable with nvcc alone and quick to
// compile, which the CI compile check relies on. All helpers need sm_80 or newer.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fair_cuda {
namespace ptx {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async global -> shared copy; src_bytes == 0 zero-fills the destination (used for rows
// and K chunks past the matrix edge, so the MMA sees zeros there).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices (8 rows x 16 bytes each); lanes 8i..8i+7 give the row addresses of
// matrix i, and register i of every lane receives 4 bytes of matrix i: row lane/4, bytes
// 4*(lane%4)..+3. That is exactly the byte layout of the A / B fragments of the integer MMAs.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D += A * B on one 16x8 tile, K = 64 signed 4-bit values (32 bytes per row).
// Fragments (g = lane/4, t = lane%4; "word" = 4 bytes of a 32-byte row):
//   a[0]: A row g, word t;  a[1]: row g+8, word t;  a[2]: row g, word t+4;  a[3]: row g+8, word t+4
//   b[0]: B column (= W row) g, word t;  b[1]: column g, word t+4
//   c[0], c[1]: D row g, cols 2t, 2t+1;  c[2], c[3]: row g+8, cols 2t, 2t+1
__device__ __forceinline__ void mma_s4(int32_t (&c)[4], const uint32_t (&a)[4],
                                       const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// D += A * B on one 16x8 tile, K = 32 signed 8-bit values; same byte layout as mma_s4.
__device__ __forceinline__ void mma_s8(int32_t (&c)[4], const uint32_t (&a)[4],
                                       const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Sign-extend the low nibble of each byte (values 0..15 -> -8..7 as int8). For a byte n < 16,
// n | (n & 8) * 0x1E sets the top four bits iff bit 3 is set; (n & 8) * 0x1E <= 0xF0 never
// carries into the next byte, so one multiply handles all four bytes.
__device__ __forceinline__ uint32_t sext_nibbles(uint32_t v) {
  return v | ((v & 0x08080808u) * 0x1Eu);
}

// Unpack 4 packed bytes (8 s4 values e0..e7, e0 in the low nibble of byte 0) into two words of
// s8: lo = {e0, e1, e2, e3}, hi = {e4, e5, e6, e7} (byte 0 first).
__device__ __forceinline__ void s4x8_to_s8x8(uint32_t packed, uint32_t& lo, uint32_t& hi) {
  const uint32_t even = sext_nibbles(packed & 0x0F0F0F0Fu);         // e0, e2, e4, e6
  const uint32_t odd = sext_nibbles((packed >> 4) & 0x0F0F0F0Fu);   // e1, e3, e5, e7
  lo = __byte_perm(even, odd, 0x5140);  // bytes: even.0, odd.0, even.1, odd.1
  hi = __byte_perm(even, odd, 0x7362);  // bytes: even.2, odd.2, even.3, odd.3
}

}  // namespace ptx
}  // namespace fair_cuda
