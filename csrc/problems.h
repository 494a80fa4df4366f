// The optional precomputed problem list of gencnp_fast::gathered_conv2d (schema in csrc/ops.cpp).
//
//   problems: int32 [B + 2G] on x's device = (samples sorted by group (stable), start of each group, size of each
//             group), i.e. the grouped-problem list of `groups`; max_group: the largest group (>= 1).
//
// A caller that planned the run on the host passes them so that the CUDA kernel needs no device-to-host
// synchronisation to size its launch; the CPU kernel groups samples on the host itself and only checks them.
#pragma once

#include <ATen/ATen.h>

namespace gencnp_fast {

// Number of groups G of a given problem list (checked against B, dtype, device and max_group), or -1 if none.
inline int64_t check_problems(const c10::optional<at::Tensor>& problems, int64_t max_group, int64_t B,
                              const at::Device& device) {
  if (!problems.has_value() || !problems->defined()) {
    TORCH_CHECK(max_group == -1, "gathered_conv2d: max_group is given without problems");
    return -1;
  }
  const at::Tensor& p = *problems;
  TORCH_CHECK(p.scalar_type() == at::kInt, "gathered_conv2d: problems must be int32, got ", p.scalar_type());
  TORCH_CHECK(p.device() == device, "gathered_conv2d: problems must be on ", device, ", got ", p.device());
  TORCH_CHECK(p.dim() == 1 && p.size(0) >= B && (p.size(0) - B) % 2 == 0,
              "gathered_conv2d: problems must be [B + 2G] (samples, group starts, group sizes) with B = ", B,
              ", got ", p.sizes());
  const int64_t G = (p.size(0) - B) / 2;
  TORCH_CHECK((B == 0) == (G == 0), "gathered_conv2d: problems must list at least one group for B = ", B);
  TORCH_CHECK(G == 0 || (max_group >= 1 && max_group <= B),
              "gathered_conv2d: max_group must be the largest group size (1..", B, "), got ", max_group);
  return G;
}

}  // namespace gencnp_fast
