// gencnp_fast::gather_channels with ATen ops (csrc/gather_channels.cpp), for the C++ code that re-compacts a
// tensor itself: out[b, j] = keep[r, j] ? x[b, take[r, j]] : 0, r = 0 for a one-row take, else b.
#pragma once

#include <ATen/ATen.h>

namespace gencnp_fast {

at::Tensor gather_channels_aten(const at::Tensor& x, const at::Tensor& take, const c10::optional<at::Tensor>& keep);

}  // namespace gencnp_fast
