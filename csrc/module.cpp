// The Python module gencnp_fast._C (pybind11). Importing it loads this shared library, which runs the
// TORCH_LIBRARY registrations of csrc/ops.cpp and the kernels, so torch.ops.gencnp_fast.* appear. What is not a
// tensor op is bound here: the run index planner (csrc/run_indices.h) with its kinds, the cache guards' walk over a
// model (csrc/fingerprint.cpp), and diagnostics (a native backtrace on a crash: csrc/crash_trace.cpp).
#include <torch/csrc/utils/pybind.h>  // pybind11 with the at::Tensor caster

#include <ATen/Parallel.h>
#include <pybind11/stl.h>

#include "run_indices.h"

namespace gencnp_fast {
const char* cpu_kernel_isa();                 // csrc/cpu/gathered_conv2d_cpu.cpp
int64_t cpu_one_pixel_min_width();           // csrc/cpu/gathered_conv2d_cpu.cpp
pybind11::tuple model_fingerprint(pybind11::handle model);  // csrc/fingerprint.cpp
at::Tensor gru_sequence(const at::Tensor& inputs, const at::Tensor& h0, const at::Tensor& w_ih,
                        const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                        const c10::optional<at::Tensor>& b_hh);  // csrc/generator_ops.cpp
void pool_units(const std::vector<at::Tensor>& features, at::Tensor& pooled);
bool install_crash_trace();  // csrc/crash_trace.cpp
}

namespace py = pybind11;
using namespace gencnp_fast;

PYBIND11_MODULE(_C, m) {
  m.doc() = "gencnp_fast compiled code: ops registered as torch.ops.gencnp_fast.*, the run index planner";
  m.attr("crash_trace") = install_crash_trace();  // GENCNP_FAST_CRASH_TRACE=1: a native backtrace on a crash
  m.def("cpu_info", [] { return std::string(cpu_kernel_isa()); },
        "ISA the CPU kernel was compiled for ('avx512f', 'avx2+fma' or 'generic-vector').");
  m.def("one_pixel_min_width", &cpu_one_pixel_min_width,
        "Weights per row from which the CPU op runs a one-pixel layer (Linear) on its one-pixel path, reading each "
        "weight row once per call (no such path without AVX-512: the largest int64).");
  m.def("num_threads", [] { return at::get_num_threads(); }, "at::get_num_threads() as seen by the extension.");
  m.def("model_fingerprint", &model_fingerprint, py::arg("model"),
        "(module tree bytes, tensors bytes, hooked, first module in training mode or None, first parameter or "
        "None): the cache guards' walk (src/gencnp_fast/model/guards.py).");
  m.def("gru_sequence", &gru_sequence, py::arg("inputs"), py::arg("h0"), py::arg("w_ih"), py::arg("w_hh"),
        py::arg("b_ih") = py::none(), py::arg("b_hh") = py::none(),
        "[T, B, H]: the GRU states over inputs [T, B, I] from h0 [B, H] (torch's equations), CPU float32, no "
        "autograd: the generator at small batch (csrc/generator_ops.cpp).");
  m.def("pool_units", &pool_units, py::arg("features"), py::arg("pooled"),
        "Global average and max of each feature map [B, C, ...] into pooled[l, :, :C] and pooled[l, :, C:2C].");

  py::enum_<SetKind>(m, "SetKind", "What a channel set of a RunProgram is.")
      .value("UNIT", SetKind::kUnit)
      .value("ALL", SetKind::kAll)
      .value("FLAT", SetKind::kFlat);
  py::enum_<RemapKind>(m, "RemapKind", "How a planned re-compaction is applied (plan/indices.py: apply_remap).")
      .value("SAME", RemapKind::kSame)
      .value("ZEROS", RemapKind::kZeros)
      .value("ROW", RemapKind::kRow)
      .value("ROWS", RemapKind::kRows);

  py::class_<RunProgram>(m, "RunProgram", "What a run of a plan needs planned (csrc/run_indices.h); each add_* "
                                          "returns the index of the new entry.")
      .def(py::init<>())
      .def("add_unit_set", &RunProgram::add_unit_set, py::arg("mask_index"))
      .def("add_all_set", &RunProgram::add_all_set, py::arg("channels"))
      .def("add_flat_set", &RunProgram::add_flat_set, py::arg("base"), py::arg("spatial"))
      .def("add_conv_groups", &RunProgram::add_conv_groups, py::arg("a"), py::arg("b"))
      .def("add_remap", &RunProgram::add_remap, py::arg("src"), py::arg("dst"))
      .def_property_readonly("num_sets", [](const RunProgram& p) { return p.sets.size(); });

  py::class_<SetIndex>(m, "SetIndex")
      .def_readonly("full", &SetIndex::full)
      .def_readonly("channels", &SetIndex::channels)
      .def_readonly("k", &SetIndex::k)
      .def_readonly("ngroups", &SetIndex::ngroups)
      .def_readonly("offset", &SetIndex::offset)
      .def_readonly("rows", &SetIndex::rows);
  py::class_<GroupIndex>(m, "GroupIndex")
      .def_readonly("ids_offset", &GroupIndex::ids_offset)
      .def_readonly("problems_offset", &GroupIndex::problems_offset)
      .def_readonly("ngroups", &GroupIndex::ngroups)
      .def_readonly("max_group", &GroupIndex::max_group);
  py::class_<RemapPlan>(m, "RemapPlan")
      .def_readonly("kind", &RemapPlan::kind)
      .def_readonly("width", &RemapPlan::width)
      .def_readonly("take_offset", &RemapPlan::take_offset)
      .def_readonly("rows", &RemapPlan::rows)
      .def_readonly("keep_offset", &RemapPlan::keep_offset);
  py::class_<RunIndices>(m, "RunIndices", "The planner's answer: three flat buffers and, per request, its record.")
      .def_readonly("i32", &RunIndices::i32)
      .def_readonly("i64", &RunIndices::i64)
      .def_readonly("u8", &RunIndices::u8)
      .def_readonly("sets", &RunIndices::sets)
      .def_readonly("conv_groups", &RunIndices::conv_groups)
      .def_readonly("remaps", &RunIndices::remaps);

  m.def("plan_run_indices", &plan_run_indices, py::arg("program"), py::arg("masks"), py::arg("batch"),
        py::arg("pin"), py::call_guard<py::gil_scoped_release>(),
        "Every index list of one run of a plan (csrc/run_indices.h); masks: uint8 0/1 [rows, C] CPU tensors.");
}
