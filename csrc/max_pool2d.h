// The argument contract of gencnp_fast::max_pool2d (schema in csrc/ops.cpp), checked in one place for its CPU
// kernel (csrc/cpu/max_pool2d_cpu.cpp) and its ATen implementation for every other device and dtype
// (csrc/max_pool2d.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace gencnp_fast {

struct MaxPoolGeom {
  int64_t kh, kw, sh, sw, ph, pw, Ho, Wo;
};

// x [B, C, H, W]; kernel >= 1, stride >= 1, 0 <= padding <= kernel / 2, the padded input at least the kernel.
MaxPoolGeom max_pool2d_geometry(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                                at::IntArrayRef padding);

// The op with ATen's max_pool2d (every device and dtype; the CPU kernel's fallback for dtypes other than float32).
at::Tensor max_pool2d_aten(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                           at::IntArrayRef padding);

}  // namespace gencnp_fast
