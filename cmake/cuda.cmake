# CUDA half of fair_calib_ext._C: adds the kernels in csrc/cuda/ to the `_C` target.
#
# Included by CMakeLists.txt only when torch has CUDA (FAIR_TORCH_CUDA_VERSION set) and nvcc was
# found or FORCE_CUDA is on; a visible GPU is not needed. Uses the variables of cmake/torch.cmake.
#
# Inputs:
#   TORCH_CUDA_ARCH_LIST  (environment or -D) e.g. "8.0;8.6;8.9;9.0" (default), "9.0+PTX",
#                         "8.6 8.9". Entries below 8.0 are dropped with a warning: the kernels use
#                         sm_80 instructions (cp.async, ldmatrix, m16n8k64 s4 / m16n8k32 s8 MMA).
# Outputs (on target _C):
#   sources csrc/cuda/{quantize,w4a4_gemm,weighted_mse}.cu (kernels, nvcc only) and
#   csrc/cuda/ops_cuda.cpp (torch glue, host compiler, needs torch's c10/cuda headers);
#   CUDA_ARCHITECTURES from the list; definitions FAIR_WITH_CUDA=1, FAIR_CUDA_ARCHS="8.0,8.6,..." (comma-separated);
#   links CUDA::cudart and torch's c10_cuda.
# Example: cmake -S . -B build -DTORCH_CUDA_ARCH_LIST="8.9" builds SASS for sm_89 only.
#
# The kernels are hand-written PTX (mma.sync / ldmatrix / cp.async) and need no CUTLASS headers.

enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

# nvcc's major version must equal the one torch was built with (as torch.utils.cpp_extension
# enforces): mixing them breaks at import time, not at build time.
string(REGEX MATCH "^[0-9]+" _fair_torch_cuda_major "${FAIR_TORCH_CUDA_VERSION}")
if(_fair_torch_cuda_major AND NOT CUDAToolkit_VERSION_MAJOR STREQUAL _fair_torch_cuda_major)
  message(FATAL_ERROR "fair: nvcc is CUDA ${CUDAToolkit_VERSION} but torch was built with CUDA "
                      "${FAIR_TORCH_CUDA_VERSION}; use a matching toolkit (CUDA_HOME / "
                      "CMAKE_CUDA_COMPILER) or build CPU-only with FAIR_CPU_ONLY=ON")
endif()

# ---- arch list ------------------------------------------------------------------------------
if(NOT DEFINED TORCH_CUDA_ARCH_LIST)
  if(DEFINED ENV{TORCH_CUDA_ARCH_LIST} AND NOT "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
    set(TORCH_CUDA_ARCH_LIST "$ENV{TORCH_CUDA_ARCH_LIST}")
  else()
    set(TORCH_CUDA_ARCH_LIST "8.0;8.6;8.9;9.0")
  endif()
endif()
string(REPLACE " " ";" _fair_arch_in "${TORCH_CUDA_ARCH_LIST}")
set(FAIR_CUDA_ARCHS "")
set(_fair_cmake_archs "")
foreach(_arch IN LISTS _fair_arch_in)
  if(_arch STREQUAL "")
    continue()
  endif()
  if(NOT _arch MATCHES "^([0-9]+)\\.([0-9]+)(a|f)?(\\+PTX)?$")
    message(FATAL_ERROR "fair: cannot read TORCH_CUDA_ARCH_LIST entry '${_arch}' (want e.g. 8.6, 9.0a, 9.0+PTX)")
  endif()
  set(_num "${CMAKE_MATCH_1}${CMAKE_MATCH_2}")
  set(_suffix "${CMAKE_MATCH_3}")
  if(_num LESS 80)
    message(WARNING "fair: dropping CUDA arch ${_arch}: the fair kernels need sm_80 or newer")
    continue()
  endif()
  list(APPEND FAIR_CUDA_ARCHS "${_arch}")
  if(CMAKE_MATCH_4)
    list(APPEND _fair_cmake_archs "${_num}${_suffix}")        # SASS + PTX
  else()
    list(APPEND _fair_cmake_archs "${_num}${_suffix}-real")   # SASS only
  endif()
endforeach()
if(NOT _fair_cmake_archs)
  message(FATAL_ERROR "fair: TORCH_CUDA_ARCH_LIST='${TORCH_CUDA_ARCH_LIST}' leaves no arch >= 8.0")
endif()

# ---- sources, flags, links ------------------------------------------------------------------
set(_fair_cuda_dir "${CMAKE_CURRENT_LIST_DIR}/../csrc/cuda")
set(FAIR_CUDA_KERNEL_SOURCES
  "${_fair_cuda_dir}/quantize.cu"
  "${_fair_cuda_dir}/w4a4_gemm.cu"
  "${_fair_cuda_dir}/weighted_mse.cu")
target_sources(_C PRIVATE ${FAIR_CUDA_KERNEL_SOURCES} "${_fair_cuda_dir}/ops_cuda.cpp")

set_target_properties(_C PROPERTIES
  CUDA_ARCHITECTURES "${_fair_cmake_archs}"
  CUDA_STANDARD 17
  CUDA_STANDARD_REQUIRED ON)
# Torch >= 2.14 headers demand C++20; the .cu files do not include torch and stay C++17.
if(FAIR_TORCH_VERSION VERSION_GREATER_EQUAL "2.14")
  set_property(TARGET _C PROPERTY CXX_STANDARD 20)
endif()
# No fast-math anywhere: the quantizer must round exactly like the CPU path (docs/kernels.md).
target_compile_options(_C PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3 -lineinfo>)
string(REPLACE ";" "," _fair_archs_csv "${FAIR_CUDA_ARCHS}")  # a ';' would split the define
target_compile_definitions(_C PRIVATE FAIR_WITH_CUDA=1 FAIR_CUDA_ARCHS="${_fair_archs_csv}")

find_library(FAIR_C10_CUDA_LIBRARY c10_cuda PATHS "${FAIR_TORCH_LIBRARY_DIR}" NO_DEFAULT_PATH REQUIRED)
target_link_libraries(_C PRIVATE CUDA::cudart "${FAIR_C10_CUDA_LIBRARY}")

message(STATUS "fair: CUDA ${CUDAToolkit_VERSION}, archs ${FAIR_CUDA_ARCHS} -> ${_fair_cmake_archs}")
