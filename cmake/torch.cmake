# Locate the torch that Python_EXECUTABLE imports and describe it to CMake.
#
# We ask torch itself (torch.utils.cpp_extension) instead of find_package(Torch): it is faster,
# does not drag in torch's own CUDA discovery on CPU-only builds, and guarantees that the headers,
# libraries and C++ ABI flag are those of the torch that will load the extension.
#
# Outputs:
#   FAIR_TORCH_VERSION        e.g. "2.13.0+cpu"
#   FAIR_TORCH_CUDA_VERSION   torch.version.cuda, empty for a CPU torch
#   FAIR_TORCH_INCLUDE_DIRS   header directories
#   FAIR_TORCH_LIBRARY_DIR    directory holding libc10 / libtorch_cpu
#   FAIR_TORCH_CXX11_ABI      0 or 1
# Function:
#   fair_link_torch(<target>) adds include dirs, libraries and the ABI define to <target>.
#
# Example: include(torch) then fair_link_torch(_C).

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
  "import torch, torch.utils.cpp_extension as c; print(';'.join([torch.__version__, torch.version.cuda or '', '|'.join(c.include_paths()), c.library_paths()[0], str(int(torch.compiled_with_cxx11_abi()))]))"
  OUTPUT_VARIABLE _fair_torch_info
  OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _fair_torch_rc)
if(NOT _fair_torch_rc EQUAL 0)
  message(FATAL_ERROR "fair: `import torch` failed for ${Python_EXECUTABLE}; install torch first")
endif()
list(GET _fair_torch_info 0 FAIR_TORCH_VERSION)
list(GET _fair_torch_info 1 FAIR_TORCH_CUDA_VERSION)
list(GET _fair_torch_info 2 _fair_inc)
list(GET _fair_torch_info 3 FAIR_TORCH_LIBRARY_DIR)
list(GET _fair_torch_info 4 FAIR_TORCH_CXX11_ABI)
string(REPLACE "|" ";" FAIR_TORCH_INCLUDE_DIRS "${_fair_inc}")

find_library(FAIR_C10_LIBRARY c10 PATHS "${FAIR_TORCH_LIBRARY_DIR}" NO_DEFAULT_PATH REQUIRED)
find_library(FAIR_TORCH_CPU_LIBRARY torch_cpu PATHS "${FAIR_TORCH_LIBRARY_DIR}" NO_DEFAULT_PATH REQUIRED)

function(fair_link_torch target)
  target_include_directories(${target} SYSTEM PRIVATE ${FAIR_TORCH_INCLUDE_DIRS})
  target_link_libraries(${target} PRIVATE "${FAIR_C10_LIBRARY}" "${FAIR_TORCH_CPU_LIBRARY}")
  target_compile_definitions(${target} PRIVATE _GLIBCXX_USE_CXX11_ABI=${FAIR_TORCH_CXX11_ABI})
endfunction()
