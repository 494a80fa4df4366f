// gencnp_fast::max_pool2d (schema in csrc/ops.cpp) for every device and dtype but CPU float32 (which has its own
// kernel, csrc/cpu/max_pool2d_cpu.cpp): ATen's max_pool2d, without dilation or ceil mode, after the same argument
// checks. Registered as CompositeExplicitAutograd, so a CUDA build needs no kernel of its own.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace gencnp_fast {
namespace {

at::Tensor max_pool2d_aten(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                           at::IntArrayRef padding) {
  TORCH_CHECK(x.dim() == 4, "max_pool2d: x must be [B, C, H, W], got shape ", x.sizes());
  for (const auto& [v, name, lo] : {std::tuple<at::IntArrayRef, const char*, int64_t>{kernel, "kernel", 1},
                                    {stride, "stride", 1}, {padding, "padding", 0}}) {
    TORCH_CHECK(v.size() == 1 || v.size() == 2, "max_pool2d: ", name, " must have 1 or 2 values, got ", v.size());
    for (const int64_t e : v) TORCH_CHECK(e >= lo, "max_pool2d: ", name, " must be >= ", lo, ", got ", v);
  }
  return at::max_pool2d(x, kernel, stride, padding, /*dilation=*/{1, 1}, /*ceil_mode=*/false);
}

}  // namespace

TORCH_LIBRARY_IMPL(gencnp_fast, CompositeExplicitAutograd, m) { m.impl("max_pool2d", &max_pool2d_aten); }

}  // namespace gencnp_fast
