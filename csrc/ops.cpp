// Operator schemas of gencnp_fast (one place for every backend).
//
// Backends register their kernels with TORCH_LIBRARY_IMPL(gencnp_fast, <Key>, m):
//   csrc/cpu/gathered_conv2d_cpu.cpp   (CPU; gather_channels_cpu.cpp and max_pool2d_cpu.cpp for the other ops)
//   csrc/cuda/*.cu                     (CUDA, built only when available)
// Both read their arguments through one check, csrc/gathered_conv_params.h. The fake (meta) kernel lives in
// src/gencnp_fast/ops.py (torch.library.register_fake); the Triton backend is the Python custom op
// gencnp_fast::gathered_conv2d_triton (src/gencnp_fast/kernels/triton_conv.py) with the same contract.
#include <torch/library.h>

TORCH_LIBRARY(gencnp_fast, m) {
  // Gathered ("compacted") 2-D convolution, groups=1, NCHW (docs/design.md §3).
  //   out[b, j] = act(bias[o] + sum_{j' valid} conv(x[b, j'], weight[o, in_idx[b, j']]) + residual[b, j])
  //   with o = out_idx[b, j]; out[b, j] = 0 where out_idx[b, j] == -1.
  // x: [B, Kin, H, W]; in_idx: int32 [B, Kin]; weight: [C_out, C_in, kh, kw] (plain layout,
  // BN folded, no pre-packing); bias: [C_out] or None; out_idx: int32 [B, Kout];
  // sample_group: int32 [B], the mask group of each sample (equal value => identical in_idx/out_idx rows; one
  // weight tile is gathered per group); residual: [B, Kout, Ho, Wo] aligned with out_idx, or None.
  // problems, max_group (optional): the grouped-problem list of sample_group, planned beforehand: int32 [B + 2G] on
  // x's device (samples sorted by group, group starts, group sizes) and the largest group. With them the CUDA
  // kernel sizes its launch without a device-to-host synchronisation; without them each backend derives them.
  // check_indices: check the index values (in_idx, out_idx, problems) before any is used: on the host for CPU
  // tensors, with device-side asserts (raised at the next synchronisation) for GPU tensors. The engine passes
  // false: its indices come from the run index planner, which builds them valid.
  // residual_take (optional): int64 [Kout] (one row for the whole batch) or [B, Kout] (a row per sample): the
  // residual is then stored for another channel set, [B, Kres, Ho, Wo], and output position j of sample b adds
  // residual[b, t] with t = residual_take[j] (or residual_take[b, j]), nothing where t == -1: the re-compaction of
  // gather_channels fused into the epilogue (ResNet's identity shortcuts). The CPU kernel reads it in place; the
  // CUDA kernel re-compacts first.
  m.def(
      "gathered_conv2d(Tensor x, Tensor in_idx, Tensor weight, Tensor? bias, Tensor out_idx, "
      "Tensor sample_group, Tensor? residual, int[2] stride, int[2] padding, int[2] dilation, "
      "bool relu, Tensor? problems=None, int max_group=-1, bool check_indices=True, "
      "Tensor? residual_take=None) -> Tensor");
  // Re-compaction of a compacted activation to another channel set (docs/design.md §3):
  //   out[b, j] = keep[r, j] ? x[b, take[r, j]] : 0,   r = 0 when take has one row, else b
  // x: [B, K, ...]; take: int64 [R, W] with R = 1 (one set for the batch) or B; keep: uint8 [R, W] or None (every
  // entry kept). Whole planes are copied (CPU: one memcpy per output channel).
  m.def("gather_channels(Tensor x, Tensor take, Tensor? keep) -> Tensor");
  // F.max_pool2d without dilation or ceil mode (padding at most half the kernel; taps outside the input are
  // skipped, NaN propagates): the pooling steps of a plan. CPU float32: csrc/cpu/max_pool2d_cpu.cpp; every other
  // device and dtype: ATen's max_pool2d (csrc/max_pool2d.cpp).
  m.def("max_pool2d(Tensor x, int[2] kernel, int[2] stride, int[2] padding) -> Tensor");
}
