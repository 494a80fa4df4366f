// The argument contract of gencnp_fast::gathered_conv2d (schema in csrc/ops.cpp), checked in one place for every
// compiled backend: gathered_conv_params() checks the arguments, naming the bad one, and fills the struct that the
// CPU kernel (csrc/cpu/) and the CUDA kernel (csrc/cuda/) read. The Python side (fake kernel, Triton launcher) checks
// the same contract with one helper, gencnp_fast/kernels/contract.py:check_gathered_conv.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace gencnp_fast {

struct GatheredConvParams {
  // Contiguous tensors; bias, residual and problems are undefined when absent.
  at::Tensor x;             // [B, Kin, H, W]
  at::Tensor in_idx;        // int32 [B, Kin]
  at::Tensor weight;        // [Cout, Cin, kh, kw]
  at::Tensor bias;          // [Cout]
  at::Tensor out_idx;       // int32 [B, Kout]
  at::Tensor sample_group;  // int32 [B]
  at::Tensor residual;      // [B, Kout, Ho, Wo], or [B, Kres, Ho, Wo] with residual_take
  at::Tensor residual_take;  // int64 [Kout] or [B, Kout]: residual channel of each output position, -1: none
                            // (undefined: the position itself)
  at::Tensor problems;      // int32 [B + 2G]: samples sorted by group, group starts, group sizes
  int64_t B = 0, Kin = 0, H = 0, W = 0;
  int64_t Cout = 0, Cin = 0, kh = 0, kw = 0;
  int64_t Kout = 0, Ho = 0, Wo = 0;
  int64_t sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  bool relu = false;
  int64_t ngroups = -1;    // G of the problem list; -1 when none was given (CUDA then derives it)
  int64_t max_group = -1;  // the largest group

  bool empty_output() const { return B == 0 || Kout == 0 || Ho == 0 || Wo == 0; }
};

// Checks and fills the params. `dtypes`: the floating dtypes the backend computes in (x, weight, bias and residual
// share one); `device_type`: the backend's device. With check_indices, the index values too: index ranges, and
// that a given problem list is a grouping of the batch consistent with sample_group; on the host for CPU tensors,
// with device-side asserts (no synchronisation; raised at the next one) for GPU tensors. On the CPU a missing
// problem list is computed here, so the CPU kernel always reads one. A backend that does not read residual_take
// in place (`fuse_residual_take` false) gets the residual re-compacted here to [B, Kout, Ho, Wo] (ATen ops) and
// residual_take undefined.
GatheredConvParams gathered_conv_params(const at::Tensor& x, const at::Tensor& in_idx, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias, const at::Tensor& out_idx,
                                        const at::Tensor& sample_group, const c10::optional<at::Tensor>& residual,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        bool relu, const c10::optional<at::Tensor>& problems, int64_t max_group,
                                        bool check_indices, const c10::optional<at::Tensor>& residual_take,
                                        bool fuse_residual_take, c10::ArrayRef<at::ScalarType> dtypes,
                                        c10::DeviceType device_type);

}  // namespace gencnp_fast
