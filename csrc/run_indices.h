// Run index planning (docs/design.md §3): from the masks of one forward, every index list the kernels of a plan
// read, computed on the host in one call before the first launch (csrc/run_indices.cpp; bound to Python in
// csrc/module.cpp as gencnp_fast._C.plan_run_indices, used by gencnp_fast/plan/indices.py).
//
// A RunProgram lists what a plan needs, built once per plan:
//   channel sets  the channels a compacted activation stores per sample: a unit's mask (SetKind::kUnit), every
//                 channel of a value (kAll), or the flattened features of an earlier set (kFlat: channel c ->
//                 features c * spatial + t);
//   conv groups   for a conv reading set a and writing set b: the partition of the batch into samples sharing both
//                 rows (one weight tile per group), with the kernels' problem list;
//   remaps        re-compaction of a tensor stored for set src to set dst (channels src lacks become zeros).
// The planner answers with a RunIndices: three flat buffers (int32, int64, uint8; pinned on request, so that each
// goes to the device in one asynchronous copy) and, per request, a record of named offsets into them.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace gencnp_fast {

enum class SetKind : int64_t { kUnit = 0, kAll = 1, kFlat = 2 };

// How a remap is applied (gencnp_fast/plan/indices.py: apply_remap, the op gencnp_fast::gather_channels).
enum class RemapKind : int64_t {
  kSame = 0,   // nothing to do
  kZeros = 1,  // nothing to read or nothing to write: zeros of `width` channels
  kRow = 2,    // one row for the batch: out[b, j] = x[b, take[0, j]], zero where keep[0, j] == 0
  kRows = 3,   // per sample: out[b, j] = x[b, take[b, j]], zero where keep[b, j] == 0
};

struct RunProgram {
  struct Set {
    SetKind kind;
    int64_t arg;          // kUnit: index of its mask; kAll: channel count; kFlat: index of the base set
    int64_t spatial = 1;  // kFlat: pixels per channel
  };
  std::vector<Set> sets;
  std::vector<std::pair<int64_t, int64_t>> conv_groups;  // (set read, set written)
  std::vector<std::pair<int64_t, int64_t>> remaps;       // (src set, dst set)

  int64_t add_unit_set(int64_t mask_index);
  int64_t add_all_set(int64_t channels);
  int64_t add_flat_set(int64_t base, int64_t spatial);
  int64_t add_conv_groups(int64_t a, int64_t b);
  int64_t add_remap(int64_t src, int64_t dst);
};

// A channel set for this run. Unless `full`, its index rows are int32 [rows, k] at `offset` in RunIndices::i32:
// ascending channels, then -1; rows = 1 when every sample has the same row (one mask for the batch), else batch.
struct SetIndex {
  bool full = false;
  int64_t channels = 0;
  int64_t k = 0;        // stored channels per sample (the compacted activation's dim 1)
  int64_t ngroups = 1;  // distinct rows over the batch
  int64_t offset = -1;
  int64_t rows = 0;
};

// The conv groups of one request, in RunIndices::i32: sample_group [batch] at `ids_offset` (group of each sample,
// numbered by first appearance) and the problem list [batch + 2 * ngroups] at `problems_offset` (samples sorted by
// group, stable; the start of each group; the size of each group). Requests with the same partition share them.
struct GroupIndex {
  int64_t ids_offset = 0;
  int64_t problems_offset = 0;
  int64_t ngroups = 1;
  int64_t max_group = 1;
};

// One remap: take int64 [rows, width] at `take_offset` of RunIndices::i64 (kRow: 1 row, kRows: batch rows) and
// keep uint8 [rows, width] at `keep_offset` of RunIndices::u8, or -1 when every entry is present.
struct RemapPlan {
  RemapKind kind = RemapKind::kSame;
  int64_t width = 0;
  int64_t take_offset = 0;
  int64_t rows = 0;
  int64_t keep_offset = -1;
};

struct RunIndices {
  at::Tensor i32, i64, u8;
  std::vector<SetIndex> sets;
  std::vector<GroupIndex> conv_groups;
  std::vector<RemapPlan> remaps;
};

// masks: uint8 0/1 [rows, C] CPU tensors (rows 1: one mask for the batch; or batch), indexed by kUnit sets.
RunIndices plan_run_indices(const RunProgram& program, const std::vector<at::Tensor>& masks, int64_t batch,
                            bool pin);

}  // namespace gencnp_fast
