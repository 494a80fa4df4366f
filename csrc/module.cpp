// The Python module gencnp_fast._C. Importing it loads this shared library, which runs the
// TORCH_LIBRARY registrations in ops.cpp and csrc/cpu/*.cpp, so torch.ops.gencnp_fast.* appear.
// The ops need no Python bindings; two small helpers are exposed for diagnostics, and compact_masks (host-side
// mask compaction of the CPU engine, on buffers; see compact_masks.cpp).
#include <Python.h>

#include <ATen/Parallel.h>

#include <string>

#include "compact_masks.h"

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

namespace {

// A contiguous buffer of `count` items of `itemsize` bytes, or a Python exception.
bool get_buffer(PyObject* obj, Py_buffer* view, Py_ssize_t itemsize, Py_ssize_t count, bool writable, const char* name) {
  if (PyObject_GetBuffer(obj, view, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0)
    return false;
  if (view->itemsize != itemsize || view->len < count * itemsize) {
    PyErr_Format(PyExc_ValueError, "%s must hold %zd items of %zd bytes (got %zd bytes of items of %zd)",
                 name, count, itemsize, view->len, view->itemsize);
    PyBuffer_Release(view);
    return false;
  }
  return true;
}

}  // namespace

// compact_masks(mask, B, C, idx, gid, counts) -> (K, ngroups)
//   mask: 1-byte items [B*C] (read); idx: int32 [B*C], gid/counts: int64 [B] (written).
static PyObject* compact_masks_py(PyObject*, PyObject* args) {
  PyObject *mask_o, *idx_o, *gid_o, *counts_o;
  Py_ssize_t B, C;
  if (!PyArg_ParseTuple(args, "OnnOOO", &mask_o, &B, &C, &idx_o, &gid_o, &counts_o)) return nullptr;
  if (B < 0 || C < 0) {
    PyErr_SetString(PyExc_ValueError, "compact_masks: B and C must be >= 0");
    return nullptr;
  }
  Py_buffer mask, idx, gid, counts;
  if (!get_buffer(mask_o, &mask, 1, B * C, false, "compact_masks: mask")) return nullptr;
  if (!get_buffer(idx_o, &idx, 4, B * C, true, "compact_masks: idx")) {
    PyBuffer_Release(&mask);
    return nullptr;
  }
  if (!get_buffer(gid_o, &gid, 8, B, true, "compact_masks: gid")) {
    PyBuffer_Release(&mask);
    PyBuffer_Release(&idx);
    return nullptr;
  }
  if (!get_buffer(counts_o, &counts, 8, B, true, "compact_masks: counts")) {
    PyBuffer_Release(&mask);
    PyBuffer_Release(&idx);
    PyBuffer_Release(&gid);
    return nullptr;
  }
  gencnp_fast::CompactResult r;
  Py_BEGIN_ALLOW_THREADS
  r = gencnp_fast::compact_masks(static_cast<const uint8_t*>(mask.buf), B, C, static_cast<int32_t*>(idx.buf),
                                 static_cast<int64_t*>(gid.buf), static_cast<int64_t*>(counts.buf));
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&mask);
  PyBuffer_Release(&idx);
  PyBuffer_Release(&gid);
  PyBuffer_Release(&counts);
  return Py_BuildValue("(LL)", static_cast<long long>(r.k), static_cast<long long>(r.ngroups));
}

// remap_positions(src, dst, B, Ks, Kd, C, take, keep) -> zeros
//   src: int32 [B*Ks], dst: int32 [B*Kd] (read); take: int64 [B*Kd], keep: 1-byte [B*Kd] (written).
static PyObject* remap_positions_py(PyObject*, PyObject* args) {
  PyObject *src_o, *dst_o, *take_o, *keep_o;
  Py_ssize_t B, Ks, Kd, C;
  if (!PyArg_ParseTuple(args, "OOnnnnOO", &src_o, &dst_o, &B, &Ks, &Kd, &C, &take_o, &keep_o)) return nullptr;
  if (B < 0 || Ks < 0 || Kd < 0 || C < 0) {
    PyErr_SetString(PyExc_ValueError, "remap_positions: B, Ks, Kd and C must be >= 0");
    return nullptr;
  }
  Py_buffer bufs[4];
  PyObject* objs[4] = {src_o, dst_o, take_o, keep_o};
  const Py_ssize_t sizes[4] = {4, 4, 8, 1};
  const Py_ssize_t counts[4] = {B * Ks, B * Kd, B * Kd, B * Kd};
  const bool writable[4] = {false, false, true, true};
  const char* names[4] = {"remap_positions: src", "remap_positions: dst", "remap_positions: take", "remap_positions: keep"};
  for (int i = 0; i < 4; ++i) {
    if (!get_buffer(objs[i], &bufs[i], sizes[i], counts[i], writable[i], names[i])) {
      for (int j = 0; j < i; ++j) PyBuffer_Release(&bufs[j]);
      return nullptr;
    }
  }
  int64_t zeros;
  Py_BEGIN_ALLOW_THREADS
  zeros = gencnp_fast::remap_positions(static_cast<const int32_t*>(bufs[0].buf), static_cast<const int32_t*>(bufs[1].buf),
                                       B, Ks, Kd, C, static_cast<int64_t*>(bufs[2].buf),
                                       static_cast<uint8_t*>(bufs[3].buf));
  Py_END_ALLOW_THREADS
  for (int i = 0; i < 4; ++i) PyBuffer_Release(&bufs[i]);
  return PyLong_FromLongLong(static_cast<long long>(zeros));
}

static PyMethodDef methods[] = {
    {"remap_positions", remap_positions_py, METH_VARARGS,
     "remap_positions(src, dst, B, Ks, Kd, C, take, keep) -> zeros: re-compaction indices of dst rows in src rows."},
    {"compact_masks", compact_masks_py, METH_VARARGS,
     "compact_masks(mask, B, C, idx, gid, counts) -> (K, ngroups): host-side compaction of a [B, C] mask."},
    {"cpu_info", cpu_info, METH_NOARGS, "ISA the CPU kernel was compiled for (e.g. 'avx2+fma')."},
    {"num_threads", num_threads, METH_NOARGS, "at::get_num_threads() as seen by the extension."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                        "gencnp_fast compiled ops (registered as torch.ops.gencnp_fast.*)",
                                        -1, methods};

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
