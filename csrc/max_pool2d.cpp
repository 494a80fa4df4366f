// gencnp_fast::max_pool2d (schema in csrc/ops.cpp): its argument check, and the op for every device and dtype but
// CPU float32 (which has its own kernel, csrc/cpu/max_pool2d_cpu.cpp): ATen's max_pool2d, without dilation or ceil
// mode. Registered as CompositeExplicitAutograd, so a CUDA build needs no kernel of its own.
#include "max_pool2d.h"

#include <torch/library.h>

#include "common.h"

namespace gencnp_fast {

MaxPoolGeom max_pool2d_geometry(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                                at::IntArrayRef padding) {
  constexpr const char* kOp = "max_pool2d: ";
  TORCH_CHECK(x.dim() == 4, kOp, "x must be [B, C, H, W], got shape ", x.sizes());
  MaxPoolGeom g;
  pair_arg(kernel, kOp, "kernel", 1, g.kh, g.kw);
  pair_arg(stride, kOp, "stride", 1, g.sh, g.sw);
  pair_arg(padding, kOp, "padding", 0, g.ph, g.pw);
  TORCH_CHECK(2 * g.ph <= g.kh && 2 * g.pw <= g.kw, kOp, "padding ", padding, " must be at most half the kernel ",
              kernel);
  const int64_t H = x.size(2), W = x.size(3);
  TORCH_CHECK(H + 2 * g.ph >= g.kh && W + 2 * g.pw >= g.kw, kOp, "input ", H, "x", W, " with padding ", padding,
              " is smaller than the kernel ", kernel);
  g.Ho = (H + 2 * g.ph - g.kh) / g.sh + 1;
  g.Wo = (W + 2 * g.pw - g.kw) / g.sw + 1;
  return g;
}

at::Tensor max_pool2d_aten(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                           at::IntArrayRef padding) {
  max_pool2d_geometry(x, kernel, stride, padding);
  return at::max_pool2d(x, kernel, stride, padding, /*dilation=*/{1, 1}, /*ceil_mode=*/false);
}

TORCH_LIBRARY_IMPL(gencnp_fast, CompositeExplicitAutograd, m) { m.impl("max_pool2d", &max_pool2d_aten); }

}  // namespace gencnp_fast
