// The `fair` op library: every schema, the CPU implementations, and the small Python module
// `fair_calib_ext._C` (importing it runs the registrations; it also exposes build info and the
// CPU ISA selector). Ops are reached only through the dispatcher (torch.ops.fair.*); their fake
// impls and autograd live in fair_calib_ext/ops.py.
#include <Python.h>

#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/isa.h"
#include "ops.h"

#ifndef FAIR_TORCH_VERSION
#define FAIR_TORCH_VERSION "unknown"
#endif
#ifndef FAIR_CUDA_ARCHS  // set by cmake/cuda.cmake together with FAIR_WITH_CUDA
#define FAIR_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(fair, m) {
  m.set_python_module("fair_calib_ext.ops");
  // int8 [..., K] (values in [-8, 7], K even) -> uint8 [..., K/2]; low nibble = even column.
  m.def("pack_int4(Tensor q) -> Tensor");
  // inverse of pack_int4
  m.def("unpack_int4(Tensor packed) -> Tensor");
  // symmetric per-row int4: packed uint8 [..., K/2] and fp32 scale [...] = clip*absmax/7
  // (1 for all-zero rows), q = clamp(round_half_even(x / scale), -8, 7).
  m.def("quantize_int4(Tensor x, float clip=1.0) -> (Tensor, Tensor)");
  // packed A [M, K/2] x packed W [N, K/2]^T in int32; out = acc*a_scale[m]*w_scale[n] (+bias[n]).
  // out_dtype int32 returns the raw accumulator.
  m.def(
      "w4a4_gemm(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias, "
      "ScalarType out_dtype) -> Tensor");
  // x [..., K] -> dynamic per-token int4 quantization fused with w4a4_gemm; out dtype = x.dtype
  m.def(
      "w4a4_linear(Tensor x, Tensor w, Tensor w_scale, Tensor? bias, float act_clip=1.0) -> "
      "Tensor");
  // public packed w [N, K/2] -> the CPU kernels' prepacked int4 layout uint8 [ceil(N/64),
  // Kp/4, 128] (Kp = K rounded up to 64; csrc/cpu/isa.h), made once per weight (W4A4Linear).
  m.def("prepack_int4(Tensor w) -> Tensor");
  // w4a4_linear on prepack_int4's output; N = w_scale.size(0), K = x.size(-1)
  m.def(
      "w4a4_linear_prepacked(Tensor x, Tensor w_prepacked, Tensor w_scale, Tensor? bias, "
      "float act_clip=1.0) -> Tensor");
  // sum_i w_i * ||a_i - b_i||^2 over positions (a, b [..., N, D]); autograd in ops.py
  m.def("weighted_mse(Tensor a, Tensor b, Tensor w) -> Tensor");
  m.def("weighted_mse_backward(Tensor grad, Tensor a, Tensor b, Tensor w) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fair, CPU, m) {
  m.impl("pack_int4", &fair::pack_int4_cpu);
  m.impl("unpack_int4", &fair::unpack_int4_cpu);
  m.impl("quantize_int4", &fair::quantize_int4_cpu);
  m.impl("w4a4_gemm", &fair::w4a4_gemm_cpu);
  m.impl("w4a4_linear", &fair::w4a4_linear_cpu);
  m.impl("prepack_int4", &fair::prepack_int4_cpu);
  m.impl("w4a4_linear_prepacked", &fair::w4a4_linear_prepacked_cpu);
  m.impl("weighted_mse", &fair::weighted_mse_cpu);
  m.impl("weighted_mse_backward", &fair::weighted_mse_backward_cpu);
}

// ---- Python module: build info and the CPU ISA selector -----------------------------------
namespace {

using fair::cpu::Isa;

PyObject* isa_list(bool (*pred)(Isa)) {
  PyObject* list = PyList_New(0);
  for (int i = 0; i < fair::cpu::kNumIsa; ++i) {
    if (pred(Isa(i))) {
      PyObject* s = PyUnicode_FromString(fair::cpu::isa_name(Isa(i)));
      PyList_Append(list, s);
      Py_DECREF(s);
    }
  }
  return list;
}

bool isa_compiled(Isa isa) { return fair::cpu::kernels(isa).compiled; }

PyObject* py_build_info(PyObject*, PyObject*) {
  try {
    const std::string archs = FAIR_CUDA_ARCHS;
    PyObject* arch_list = PyList_New(0);
    size_t start = 0;
    while (start < archs.size()) {
      size_t end = archs.find_first_of(";, ", start);
      if (end == std::string::npos) end = archs.size();
      if (end > start) {
        PyObject* s = PyUnicode_FromString(archs.substr(start, end - start).c_str());
        PyList_Append(arch_list, s);
        Py_DECREF(s);
      }
      start = end + 1;
    }
#ifdef FAIR_WITH_CUDA
    PyObject* cuda = Py_True;
#else
    PyObject* cuda = Py_False;
#endif
    return Py_BuildValue("{s:s,s:O,s:N,s:N,s:N,s:s}", "torch_version", FAIR_TORCH_VERSION,
                         "cuda", cuda, "cuda_archs", arch_list, "cpu_isa_compiled",
                         isa_list(isa_compiled), "cpu_isa_supported",
                         isa_list(fair::cpu::isa_supported), "cpu_isa",
                         fair::cpu::isa_name(fair::cpu::active_isa()));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* py_get_cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(fair::cpu::isa_name(fair::cpu::active_isa()));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  Isa isa;
  if (std::string(name) == "auto") {
    isa = fair::cpu::best_isa();
  } else if (!fair::cpu::parse_isa(name, &isa)) {
    PyErr_Format(PyExc_ValueError,
                 "unknown CPU ISA path '%s'; expected auto, scalar, avx2, avx512_vnni or amx", name);
    return nullptr;
  }
  if (!fair::cpu::isa_supported(isa)) {
    PyErr_Format(PyExc_ValueError, "CPU ISA path '%s' is not supported on this machine/build",
                 name);
    return nullptr;
  }
  try {
    return PyUnicode_FromString(fair::cpu::isa_name(fair::cpu::set_active_isa(isa)));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

// Test hook: the path FAIR_CPU_ISA=<value> would select (the variable is read once per process).
PyObject* py_isa_for_env(PyObject*, PyObject* arg) {
  const char* value = PyUnicode_AsUTF8(arg);
  if (value == nullptr) return nullptr;
  // collect TORCH_WARN (the fallback warning) and re-issue it as a Python UserWarning
  struct Collect : c10::WarningHandler {
    std::vector<std::string> msgs;
    void process(const c10::Warning& w) override { msgs.push_back(w.msg()); }
  } collect;
  try {
    Isa isa;
    {
      c10::WarningUtils::WarningHandlerGuard guard(&collect);
      isa = fair::cpu::isa_from_env_value(value);
    }
    for (const auto& m : collect.msgs) {
      if (PyErr_WarnEx(PyExc_UserWarning, m.c_str(), 1) < 0) return nullptr;
    }
    return PyUnicode_FromString(fair::cpu::isa_name(isa));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* py_selftest_pack(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(fair::cpu::selftest_pack_panels().c_str());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyMethodDef kMethods[] = {
    {"build_info", py_build_info, METH_NOARGS, "Build configuration of the fair op library."},
    {"_get_cpu_isa", py_get_cpu_isa, METH_NOARGS, "Name of the CPU kernel path in use."},
    {"_set_cpu_isa", py_set_cpu_isa, METH_O,
     "Force a CPU kernel path ('auto' = best); returns the previous one."},
    {"_isa_for_env", py_isa_for_env, METH_O,
     "Test hook: the CPU path FAIR_CPU_ISA=<value> selects (warns on fallback)."},
    {"_selftest_pack_panels", py_selftest_pack, METH_NOARGS,
     "Test hook: vector prepacker and gemms vs the scalar ones; '' if all agree."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "The fair op library (torch.ops.fair).", -1,
                       kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&kModule); }
