// CPU instruction-set paths of the fair kernels and the raw-pointer kernel table each provides.
//
// Every path computes the same exact int32 products; they differ only in how. The GEMM works on
// two buffers prepared by the driver (csrc/cpu/w4a4_gemm.cpp):
//
//   A   int8 activations, row-major [Mp][Kp] (Mp = M rounded up to `mr`, Kp = K rounded up to
//       64), zero padded. Natural k order.
//   B   the *prepacked* int4 weights (fair::prepack_int4), 4 bits per weight like the public
//       pack_int4 layout, made once per weight. Channels are cut into blocks of 64 (N padded to
//       Np = 64 * ceil(N / 64)) and k into quads of 4 (K padded to Kp); block b holds Kp / 4
//       quads of 128 bytes:
//
//         byte [b][q][h][i], h in {0, 1}, i in [0, 64), i = 4 j + t:
//           low nibble  = u(channel 64 b + 32 h + j,      k = 4 q + t)
//           high nibble = u(channel 64 b + 32 h + 16 + j, k = 4 q + t)
//         u = w + 8 in [0, 15] (padding: w = 0, u = 8)
//
//       so one 64-byte load gives two zmm of unpacked weights (`x & 15`, `(x >> 4) & 15`), each
//       = 16 channels x 4 consecutive k: the VNNI / AMX "B" operand. A block is Kp * 32 bytes.
//       Its unpacked form (u8 [kq][64][4], 256 bytes per quad: channel j of the block at byte
//       4 j + t) is what the AVX2 and AMX kernels read from a thread-local buffer.
//   C   int32 [mb][ldc]; gemm writes (or adds to) C[i][64 b + j] = sum_k A[i][k] * u_b[k][j]
//       for the 64 channels j of each of `nblocks` blocks b over its k range. That sum
//       includes + 8 * rowsum(A[i]); the epilogue subtracts it.
//
// Exactness: |A| <= 8 and u <= 15, so every partial sum stays far inside int32 (and inside int16
// for the AVX2 path's 128-quad int16 accumulation, see kernels_avx2.cpp).
#pragma once

#include <cstdint>
#include <string>

namespace fair::cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2, kAmx = 3 };
constexpr int kNumIsa = 4;

constexpr int64_t kBlockN = 64;       // channels per prepacked block
constexpr int64_t kQuadBytes = 128;   // prepacked bytes per quad of one block (64 ch x 4 k / 2)
constexpr int64_t kKAlign = 64;       // K is padded to a multiple of this

// Output element type of the epilogue.
enum class OutKind : int { kF32 = 0, kBF16 = 1, kF16 = 2, kI32 = 3 };

// Raw-pointer kernels of one ISA path.
struct KernelTable {
  const char* name;
  bool compiled;  // false: this build's compiler could not target the ISA
  int mr;         // A rows are padded to a multiple of mr (1: the kernel takes any row count)
  int tile_m;     // preferred row multiple of a task (the micro tile's rows)
  // C[0:mb, 0:64 nblocks] (=|+=) A[0:mb, 0:4kq] . u^T for `nblocks` prepacked blocks, block b
  // at B + b * ldb (kq quads of 128 bytes each, see above); mb % mr == 0, kq % 16 == 0; A row
  // stride lda bytes, C row stride ldc int32. `scratch` is a thread-local buffer of at least
  // kq * 256 bytes (for paths that unpack a block once per call).
  void (*gemm)(const int8_t* A, int64_t lda, int64_t mb, const uint8_t* B, int64_t ldb,
               int64_t nblocks, int64_t kq, int32_t* C, int64_t ldc, bool accumulate,
               uint8_t* scratch);
  // Quantizes one fp32 row of length K (see docs/kernels.md): writes q[0:K] (int8 in [-8, 7]),
  // *scale and *rowsum = sum(q). Returns false (writing nothing) if the row has inf/NaN.
  bool (*quantize_row)(const float* x, int64_t K, float clip, int8_t* q, float* scale,
                       int32_t* rowsum);
  // out[i][j] = acc = C[i][j] - 8 * rowsum[i] for kI32 (a_scale etc. unused), else
  // ((float)acc * a_scale[i]) * w_scale[j] (+ bias[j]) in fp32, rounded to nearest even into
  // `kind`; rows x cols, out row stride ldo elements.
  void (*epilogue)(const int32_t* C, int64_t ldc, int64_t rows, int64_t cols,
                   const int32_t* rowsum, const float* a_scale, const float* w_scale,
                   const float* bias, void* out, int64_t ldo, OutKind kind);
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

// Prepacks channels [n0, n0 + 64 nblocks) of the public packed weights W [N][K/2] (row stride
// ldw bytes) into `nblocks` blocks of Kp / 4 quads (layout above). Channels >= N and k >= K
// become weight 0. The vector version (AVX-512 when the CPU has it) and the scalar one agree
// byte for byte.
void prepack_blocks_scalar(const uint8_t* W, int64_t ldw, int64_t N, int64_t K, int64_t n0,
                           int64_t nblocks, uint8_t* out);
// Quads [q0, q1) of the one block whose first channel is c0 (blk = the block's start).
void prepack_quads_scalar(const uint8_t* W, int64_t ldw, int64_t N, int64_t K, int64_t c0,
                          int64_t q0, int64_t q1, uint8_t* blk);
void prepack_blocks(const uint8_t* W, int64_t ldw, int64_t N, int64_t K, int64_t n0,
                    int64_t nblocks, uint8_t* out);

// Test hook: compares the vector prepacker with the scalar one and every supported gemm with
// the scalar gemm on random data; returns "" or a description of the first mismatch.
std::string selftest_pack_panels();

// Shared scalar helpers: the reference quantizer's scale, the reference epilogue.
float row_scale(float absmax, float clip);
void epilogue_scalar(const int32_t* C, int64_t ldc, int64_t rows, int64_t cols,
                     const int32_t* rowsum, const float* a_scale, const float* w_scale,
                     const float* bias, void* out, int64_t ldo, OutKind kind);

#if defined(FAIR_HAVE_AVX2)
void prepack_blocks_avx2(const uint8_t* W, int64_t ldw, int64_t N, int64_t K, int64_t n0,
                         int64_t nblocks, uint8_t* out);
// The AVX2 row quantizer, shared by the AVX-512 and AMX tables (every such CPU has AVX2).
bool quantize_row_avx2(const float* x, int64_t K, float clip, int8_t* q, float* scale,
                       int32_t* rowsum);
#endif
#if defined(FAIR_HAVE_AVX512_VNNI)
// AVX-512 helpers shared with the AMX table: the epilogue, the prepacker, the block unpacker
// (prepacked block -> u8 [kq][64][4]).
void epilogue_avx512(const int32_t* C, int64_t ldc, int64_t rows, int64_t cols,
                     const int32_t* rowsum, const float* a_scale, const float* w_scale,
                     const float* bias, void* out, int64_t ldo, OutKind kind);
void prepack_blocks_avx512(const uint8_t* W, int64_t ldw, int64_t N, int64_t K, int64_t n0,
                           int64_t nblocks, uint8_t* out);
void unpack_block_avx512(const uint8_t* B, int64_t kq, uint8_t* out);
// The VNNI gemm (any row count), which the AMX path uses for the rows below a 32-row tile.
void gemm_avx512_vnni(const int8_t* A, int64_t lda, int64_t mb, const uint8_t* B, int64_t ldb,
                      int64_t nblocks, int64_t kq, int32_t* C, int64_t ldc, bool accumulate,
                      uint8_t* scratch);
#endif

}  // namespace fair::cpu
