// The Python module gencnp_fast._C. Importing it loads this shared library, which runs the
// TORCH_LIBRARY registrations in ops.cpp and csrc/cpu/*.cpp, so torch.ops.gencnp_fast.* appear.
// The ops need no Python bindings; two small helpers are exposed for diagnostics.
#include <Python.h>

#include <ATen/Parallel.h>

#include <string>

namespace gencnp_fast {
const char* cpu_kernel_isa();  // csrc/cpu/gathered_conv2d_cpu.cpp
}

static PyObject* cpu_info(PyObject*, PyObject*) {
  std::string s = gencnp_fast::cpu_kernel_isa();
  return PyUnicode_FromString(s.c_str());
}

static PyObject* num_threads(PyObject*, PyObject*) {
  return PyLong_FromLong(static_cast<long>(at::get_num_threads()));
}

static PyMethodDef methods[] = {
    {"cpu_info", cpu_info, METH_NOARGS, "ISA the CPU kernel was compiled for (e.g. 'avx2+fma')."},
    {"num_threads", num_threads, METH_NOARGS, "at::get_num_threads() as seen by the extension."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                        "gencnp_fast compiled ops (registered as torch.ops.gencnp_fast.*)",
                                        -1, methods};

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
