// CPU instruction-set paths of the fair kernels and the raw-pointer kernel table each provides.
//
// Every path computes the same exact int32 products; they differ only in how. The GEMM works on
// two buffers prepared by the driver (csrc/cpu/w4a4_gemm.cpp):
//
//   A   int8 activations, row-major [Mp][Kp] (Mp = M rounded up to `mr`, Kp = K rounded up to
//       64), zero padded. Natural k order.
//   B   a block of packed weight *panels*. A panel holds 16 output channels for a range of kq
//       k-quads: byte [q][j][t] (64 bytes per quad) = weight(n0 + j, k0 + 4q + t), stored as
//       w + 8 in [0, 15] (u8) when `weight_offset`, else as s8. Panels follow each other, kq*64
//       bytes apart. This is the VNNI / AMX "B" layout: one 32-bit lane = 4 consecutive k of one
//       channel.
//   C   int32 [mb][ldc]; the kernel writes (or adds to) C[i][16p + j] = sum_k A[i][k] * B[p][k][j]
//       over its k range. With `weight_offset` that sum includes + 8 * rowsum(A[i]); the driver
//       subtracts it once at the end.
//
// Exactness: |A| <= 8 and |w + 8| <= 15, so every partial sum stays far inside int32 (and inside
// int16 for the AVX2 path's 128-quad int16 accumulation, see kernels_avx2.cpp).
#pragma once

#include <cstdint>
#include <string>

namespace fair::cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2, kAmx = 3 };
constexpr int kNumIsa = 4;

// Raw-pointer kernels of one ISA path.
struct KernelTable {
  const char* name;
  bool compiled;       // false: this build's compiler could not target the ISA
  int mr;              // rows per micro tile; A rows must be padded to a multiple
  int panel_multiple;  // number of 16-channel panels per micro tile; B panel count multiple of it
  bool weight_offset;  // B holds w + 8 (u8); C then includes + 8 * rowsum(A)
  // C[0:mb, 0:16*npanels] (=|+=) A[0:mb, 0:4kq] . B^T; mb % mr == 0, npanels % panel_multiple
  // == 0, kq % 16 == 0; A row stride lda bytes, C row stride ldc int32.
  void (*gemm)(const int8_t* A, int64_t lda, int64_t mb, const uint8_t* B, int64_t npanels,
               int64_t kq, int32_t* C, int64_t ldc, bool accumulate);
  // Reorders channels [n0, n0 + 16 npanels) x k [k0, k0 + 4 kq) of the public packed weights
  // W [N][K/2] into panels (layout above; u8 w + 8 if offset, else s8). Channels >= N and
  // k >= K become weight 0. kq % 16 == 0.
  void (*pack_panels)(const uint8_t* W, int64_t N, int64_t K, int64_t n0, int64_t npanels,
                      int64_t k0, int64_t kq, bool offset, uint8_t* out);
  // Quantizes one fp32 row of length K (see docs/kernels.md): writes q[0:K] (int8 in [-8, 7]),
  // *scale and *rowsum = sum(q). Returns false (writing nothing) if the row has inf/NaN.
  bool (*quantize_row)(const float* x, int64_t K, float clip, int8_t* q, float* scale,
                       int32_t* rowsum);
};

// Tables defined by the per-ISA files; a table whose ISA was not compiled has compiled == false
// and null function pointers.
extern const KernelTable kScalarKernels;
extern const KernelTable kAvx2Kernels;
extern const KernelTable kAvx512VnniKernels;
extern const KernelTable kAmxKernels;

const KernelTable& kernels(Isa isa);
const char* isa_name(Isa isa);
// Parses "scalar" | "avx2" | "avx512_vnni" | "amx"; returns false for anything else.
bool parse_isa(const char* name, Isa* out);
// Compiled into this build, present on this CPU and enabled by the OS (XSAVE state; for AMX the
// Linux arch_prctl XTILEDATA permission, requested once here).
bool isa_supported(Isa isa);
Isa best_isa();
// The path the ops use: FAIR_CPU_ISA from the environment at first use (an unknown name is an
// error; a known but unsupported one falls back to best_isa() with a warning), else best_isa().
Isa active_isa();
// The choice active_isa() makes for a value of FAIR_CPU_ISA (null/""/"auto": best_isa()).
Isa isa_from_env_value(const char* env);
// Forces a path (throws c10::Error if unsupported). Returns the previous one.
Isa set_active_isa(Isa isa);

// Test hook: compares every supported path's pack_panels with the scalar one on random
// weights, both encodings; returns "" or a description of the first mismatch.
std::string selftest_pack_panels();

// Shared scalar helper: the reference quantizer of one row, used by the scalar path and for the
// tails of the vector paths.
float row_scale(float absmax, float clip);

void pack_panels_scalar(const uint8_t* W, int64_t N, int64_t K, int64_t n0, int64_t npanels,
                        int64_t k0, int64_t kq, bool offset, uint8_t* out);

#if defined(FAIR_HAVE_AVX2)
// The AVX2 weight packer (both encodings), shared with the AVX-512 and AMX tables.
void pack_panels_avx2(const uint8_t* W, int64_t N, int64_t K, int64_t n0, int64_t npanels,
                      int64_t k0, int64_t kq, bool offset, uint8_t* out);
// The AVX2 row quantizer, shared by the AVX-512 and AMX tables (every such CPU has AVX2).
bool quantize_row_avx2(const float* x, int64_t K, float clip, int8_t* q, float* scale,
                       int32_t* rowsum);
#endif

}  // namespace fair::cpu
