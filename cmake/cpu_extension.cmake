# CPU sources of the `fair` op library and the flags they need.
#
# Every ISA variant is compiled into the one module: each kernel file marks its functions with
# __attribute__((target(...))) (see csrc/cpu/isa.h), and csrc/cpu/isa.cpp picks one at run time
# by cpuid. Never -march=native: the module must run on any x86-64. A variant the compiler cannot
# target (e.g. AMX with an old gcc) is compiled as an empty table and reported as not compiled.
#
# Outputs:
#   FAIR_CPU_SOURCES        list of .cpp files
#   FAIR_CPU_ISA_COMPILED   ";"-free, comma separated names, e.g. "scalar,avx2,avx512_vnni,amx"
#
# Example: include(cpu_extension) then add ${FAIR_CPU_SOURCES} to the target.

include(CheckCXXSourceCompiles)

set(FAIR_CPU_SOURCES
  csrc/cpu/isa.cpp
  csrc/cpu/quantize.cpp
  csrc/cpu/w4a4_gemm.cpp
  csrc/cpu/weighted_mse.cpp
  csrc/cpu/kernels_scalar.cpp
  csrc/cpu/kernels_avx2.cpp
  csrc/cpu/kernels_avx512_vnni.cpp
  csrc/cpu/kernels_amx.cpp)

# Exact, reproducible float arithmetic: no FMA contraction (keeps the fp32 epilogue identical on
# every ISA path), never fast-math. -fno-math-errno only lets nearbyint/fabs inline.
if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  add_compile_options("$<$<COMPILE_LANGUAGE:CXX>:-ffp-contract=off;-fno-math-errno;-Wall>")
endif()

set(FAIR_CPU_ISA_COMPILED "scalar")
set(_fair_x86 OFF)
if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64|i.86")
  set(_fair_x86 ON)
endif()

# fair_check_isa(<name> <target-string> <intrinsic-snippet> <define>)
function(fair_check_isa name target snippet define)
  set(_src "#include <immintrin.h>\n__attribute__((target(\"${target}\"))) int f(){ ${snippet} }\nint main(){return 0;}")
  set(CMAKE_REQUIRED_QUIET ON)
  check_cxx_source_compiles("${_src}" ${define})
  if(${define})
    set(FAIR_CPU_ISA_COMPILED "${FAIR_CPU_ISA_COMPILED},${name}" PARENT_SCOPE)
    add_compile_definitions("$<$<COMPILE_LANGUAGE:CXX>:${define}=1>")
  else()
    message(WARNING "fair: the compiler cannot target ${name} (${target}); that path is left out")
  endif()
endfunction()

if(_fair_x86)
  fair_check_isa(avx2 "avx2,fma"
    "__m256i a = _mm256_set1_epi8(1); a = _mm256_maddubs_epi16(a, a); return _mm256_extract_epi32(a, 0);"
    FAIR_HAVE_AVX2)
  fair_check_isa(avx512_vnni "avx512f,avx512bw,avx512vl,avx512vnni"
    "__m512i a = _mm512_set1_epi8(1); a = _mm512_dpbusd_epi32(a, a, a); return _mm512_reduce_add_epi32(a);"
    FAIR_HAVE_AVX512_VNNI)
  fair_check_isa(amx "amx-tile,amx-int8,avx512f"
    "static unsigned char cfg[64] = {1}; _tile_loadconfig(cfg); _tile_zero(0); _tile_dpbssd(0, 1, 2); _tile_release(); return 0;"
    FAIR_HAVE_AMX)
endif()
