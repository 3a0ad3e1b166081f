// Run-time selection of the CPU kernel path (cpuid + OS support + FAIR_CPU_ISA override).
#include "cpu/isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define FAIR_X86 1
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fair::cpu {
namespace {

struct CpuFeatures {
  bool avx2 = false;  // with fma and f16c
  bool avx512_vnni = false;  // with avx512f + avx512bw + avx512vl
  bool amx_int8 = false;     // with amx-tile, and the OS granted XTILEDATA
};

#ifdef FAIR_X86
uint64_t read_xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

// Linux keeps AMX tile data disabled per process until it is requested.
bool request_amx_permission() {
#if defined(__linux__) && defined(__x86_64__)
  constexpr long kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  unsigned long bitmask = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &bitmask) != 0) return false;
  return (bitmask & (1ul << kXfeatureXtiledata)) != 0;
#else
  return false;
#endif
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#ifdef FAIR_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1;
  const bool fma = (c >> 12) & 1, f16c = (c >> 29) & 1;  // the AVX2 path also uses these
  if (!osxsave) return f;
  const uint64_t xcr0 = read_xcr0();
  const bool os_avx = (xcr0 & 0x6) == 0x6;             // SSE + AVX state
  const bool os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0;  // opmask + ZMM_Hi256 + Hi16_ZMM
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;     // XTILECFG + XTILEDATA
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = (b >> 5) & 1;
  const bool avx512f = (b >> 16) & 1, avx512bw = (b >> 30) & 1, avx512vl = (b >> 31) & 1;
  const bool avx512vnni = (c >> 11) & 1;
  const bool amx_tile = (d >> 24) & 1, amx_int8 = (d >> 25) & 1;
  f.avx2 = avx2 && fma && f16c && os_avx;
  f.avx512_vnni = avx512f && avx512bw && avx512vl && avx512vnni && os_avx512;
  f.amx_int8 = amx_tile && amx_int8 && avx512f && os_avx512 && os_amx && request_amx_permission();
#endif
  return f;
}

const CpuFeatures& features() {
  static const CpuFeatures f = detect();
  return f;
}

std::atomic<int> g_active{-1};
std::once_flag g_init_once;

}  // namespace

const KernelTable& kernels(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return kAvx2Kernels;
    case Isa::kAvx512Vnni: return kAvx512VnniKernels;
    case Isa::kAmx: return kAmxKernels;
    default: return kScalarKernels;
  }
}

const char* isa_name(Isa isa) { return kernels(isa).name; }

bool parse_isa(const char* name, Isa* out) {
  for (int i = 0; i < kNumIsa; ++i) {
    if (std::strcmp(name, isa_name(Isa(i))) == 0) {
      *out = Isa(i);
      return true;
    }
  }
  return false;
}

bool isa_supported(Isa isa) {
  if (!kernels(isa).compiled) return false;
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2: return features().avx2;
    case Isa::kAvx512Vnni: return features().avx512_vnni;
    case Isa::kAmx: return features().amx_int8;
  }
  return false;
}

Isa best_isa() {
  for (Isa isa : {Isa::kAmx, Isa::kAvx512Vnni, Isa::kAvx2}) {
    if (isa_supported(isa)) return isa;
  }
  return Isa::kScalar;
}

Isa isa_from_env_value(const char* env) {
  Isa isa = best_isa();
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return isa;
  Isa wanted;
  TORCH_CHECK(parse_isa(env, &wanted), "FAIR_CPU_ISA=", env,
              " is not one of: auto, scalar, avx2, avx512_vnni, amx");
  if (isa_supported(wanted)) return wanted;
  TORCH_WARN("FAIR_CPU_ISA=", env, " is not supported by this CPU/build; using ", isa_name(isa));
  return isa;
}

Isa active_isa() {
  std::call_once(g_init_once, [] {
    if (g_active.load() >= 0) return;  // set_active_isa() ran first
    const Isa isa = isa_from_env_value(std::getenv("FAIR_CPU_ISA"));
    int expected = -1;
    g_active.compare_exchange_strong(expected, int(isa));
  });
  return Isa(g_active.load());
}

Isa set_active_isa(Isa isa) {
  TORCH_CHECK(isa_supported(isa), "CPU ISA path '", isa_name(isa),
              "' is not supported here (compiled: ", kernels(isa).compiled ? "yes" : "no",
              "; best available: ", isa_name(best_isa()), ")");
  Isa prev = active_isa();
  g_active.store(int(isa));
  return prev;
}

void prepack_blocks(const uint8_t* W, int64_t ldw, int64_t N, int64_t K, int64_t n0,
                    int64_t nblocks, uint8_t* out) {
#if defined(FAIR_HAVE_AVX512_VNNI) && defined(FAIR_HAVE_AVX2)
  // the vector prepacker follows the forced path too, so FAIR_CPU_ISA=scalar runs no AVX-512
  if (active_isa() == Isa::kAvx512Vnni || active_isa() == Isa::kAmx) {
    return prepack_blocks_avx512(W, ldw, N, K, n0, nblocks, out);
  }
#endif
#if defined(FAIR_HAVE_AVX2)
  if (active_isa() == Isa::kAvx2) return prepack_blocks_avx2(W, ldw, N, K, n0, nblocks, out);
#endif
  prepack_blocks_scalar(W, ldw, N, K, n0, nblocks, out);
}

std::string selftest_pack_panels() {
  uint32_t state = 12345;
  auto next = [&state] {
    state = state * 1664525u + 1013904223u;
    return uint8_t(state >> 24);
  };
  // 1. the vector prepackers against the scalar one (channel and K edges, a row stride > K/2)
  struct Packer {
    const char* name;
    Isa isa;
    void (*fn)(const uint8_t*, int64_t, int64_t, int64_t, int64_t, int64_t, uint8_t*);
  };
  std::vector<Packer> packers;
#if defined(FAIR_HAVE_AVX2)
  packers.push_back({"avx2", Isa::kAvx2, prepack_blocks_avx2});
#endif
#if defined(FAIR_HAVE_AVX512_VNNI) && defined(FAIR_HAVE_AVX2)
  packers.push_back({"avx512", Isa::kAvx512Vnni, prepack_blocks_avx512});
#endif
  for (const Packer& pk : packers) {
    if (!isa_supported(pk.isa)) continue;
    for (int64_t N : {5, 64, 100, 128, 200}) {
      for (int64_t K : {2, 30, 62, 64, 130, 1024 + 66, 2048}) {
        const int64_t ldw = K / 2 + 3;
        std::vector<uint8_t> W(size_t(N * ldw));
        for (auto& b : W) b = next();
        const int64_t nb = (N + kBlockN - 1) / kBlockN;
        const int64_t nq = (K + kKAlign - 1) / kKAlign * kKAlign / 4;
        std::vector<uint8_t> a(size_t(nb * nq * kQuadBytes), 0xAA), b(a.size(), 0x55);
        prepack_blocks_scalar(W.data(), ldw, N, K, 0, nb, a.data());
        pk.fn(W.data(), ldw, N, K, 0, nb, b.data());
        if (a != b) {
          return std::string(pk.name) + " prepack differs from scalar at N=" + std::to_string(N) +
                 " K=" + std::to_string(K);
        }
      }
    }
  }
  // 2. every supported gemm against the scalar gemm on random blocks (u in [0, 15], all rows)
  for (int i = 1; i < kNumIsa; ++i) {
    const KernelTable& kt = kernels(Isa(i));
    if (!isa_supported(Isa(i))) continue;
    for (int64_t mb : {1, 5, 6, 7, 13, 32, 64}) {
      if (mb % kt.mr != 0) continue;
      for (int64_t kq : {16, 48, 256}) {
        std::vector<int8_t> A(size_t(mb * 4 * kq));
        for (auto& v : A) v = int8_t(int(next() % 16) - 8);
        const int64_t nb = 3, ldb = kq * kQuadBytes + 64, ldc = nb * kBlockN + 16;
        std::vector<uint8_t> B(size_t(nb * ldb));
        for (auto& v : B) v = next();
        std::vector<uint8_t> scratch(size_t(kq * 256));
        for (bool acc : {false, true}) {
          std::vector<int32_t> c0(size_t(mb * ldc), 7), c1(c0);
          kScalarKernels.gemm(A.data(), 4 * kq, mb, B.data(), ldb, nb, kq, c0.data(), ldc, acc,
                              nullptr);
          kt.gemm(A.data(), 4 * kq, mb, B.data(), ldb, nb, kq, c1.data(), ldc, acc,
                  scratch.data());
          if (c0 != c1) {
            return std::string(kt.name) + ": gemm differs from scalar at mb=" +
                   std::to_string(mb) + " kq=" + std::to_string(kq) +
                   " accumulate=" + std::to_string(acc);
          }
        }
      }
    }
  }
  return "";
}

float row_scale(float absmax, float clip) {
  // IEEE division, not a reciprocal multiply; a zero (or fully underflowed) scale becomes 1 so
  // that an all-zero row quantizes to codes 0 with scale 1.
  float s = (clip * absmax) / 7.0f;
  return s == 0.0f ? 1.0f : s;
}

}  // namespace fair::cpu
