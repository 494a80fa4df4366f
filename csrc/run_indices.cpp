// Run index planning: the implementation of csrc/run_indices.h (the semantics, in plain torch, of
// tests/planner_oracle.py, which tests/test_run_indices.py checks this against bit for bit).
#include "run_indices.h"

#include <ATen/ATen.h>

#include "mask_rows.h"  // grouping, compaction and re-compaction of rows

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

namespace gencnp_fast {
namespace {

struct HostSet {
  bool full = false;
  int64_t channels = 0;
  int64_t k = 0;        // stored channels (idx columns)
  int64_t ngroups = 1;  // distinct rows over the batch
  int64_t rows = 1;     // rows of idx: 1 (one group) or batch
  std::vector<int64_t> gid;  // batch (empty: all zero)
  // where idx comes from: a unit's mask (its distinct rows `first`), or a base set flattened by `spatial`
  const uint8_t* mask = nullptr;
  int64_t C = 0;
  std::vector<int64_t> first;
  int64_t base = -1, spatial = 1;
  int64_t off = -1;        // offset of idx in the int32 output (a flat set with spatial 1 shares its base's)
  int32_t* idx = nullptr;  // rows x k, in the int32 output
};

// Metadata of a unit's set (rows, groups, k); its idx is written later, straight into the output.
HostSet unit_set(const at::Tensor& mask, int64_t batch) {
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kByte && mask.is_contiguous() && mask.device().is_cpu(),
              "plan_run_indices: masks must be contiguous uint8 [rows, C] CPU tensors, got ", mask.sizes());
  const int64_t rows = mask.size(0), C = mask.size(1);
  TORCH_CHECK(rows == 1 || rows == batch, "plan_run_indices: a mask has ", rows, " rows, batch is ", batch);
  TORCH_CHECK(C < INT32_MAX, "plan_run_indices: a mask has ", C, " channels, more than int32 indices hold");
  const uint8_t* m = mask.data_ptr<uint8_t>();
  HostSet s;
  s.channels = C;
  std::vector<int64_t> gid, first;
  const int64_t G = rows == 1 ? 1 : group_rows(m, rows, C, gid, first);
  if (rows == 1) first.assign(1, 0);
  int64_t k = 0, kmin = C;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t c = count_row(m + first[g] * C, C);
    k = std::max(k, c);
    kmin = std::min(kmin, c);
  }
  if (kmin == C) {  // every row keeps every channel
    s.full = true;
    s.k = C;
    return s;
  }
  s.k = k;
  s.ngroups = G;
  s.rows = G == 1 ? 1 : batch;
  s.mask = m;
  s.C = C;
  s.first = std::move(first);
  if (s.rows > 1) s.gid = std::move(gid);
  return s;
}

HostSet flat_set(const HostSet& base, int64_t base_index, int64_t spatial) {
  HostSet s;
  s.channels = base.channels * spatial;
  if (base.full) {
    s.full = true;
    s.k = s.channels;
    return s;
  }
  s.k = base.k * spatial;
  s.ngroups = base.ngroups;
  s.rows = base.rows;
  s.gid = base.gid;
  s.base = base_index;
  s.spatial = spatial;
  return s;
}

// Compact a unit set's distinct rows into s.idx (room for rows x k + 8), copy them to the other rows of their group.
void write_unit_idx(HostSet& s, int64_t batch) {
  const int64_t k = s.k;
  for (size_t g = 0; g < s.first.size(); ++g) {
    const int64_t r = s.rows == 1 ? 0 : s.first[g];
    int32_t* out = s.idx + r * k;
    const int64_t j = compact_row(s.mask + s.first[g] * s.C, s.C, out);  // may write up to 7 past the count
    for (int64_t t = j; t < k; ++t) out[t] = -1;
  }
  if (s.rows > 1) {
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t r = s.first[s.gid[b]];
      if (r != b) std::memcpy(s.idx + b * k, s.idx + r * k, static_cast<size_t>(k) * sizeof(int32_t));
    }
  }
}

// Channel c of the base -> features c * spatial + t.
void write_flat_idx(HostSet& s, const HostSet& base) {
  for (int64_t r = 0; r < s.rows; ++r) {
    const int32_t* in = base.idx + r * base.k;
    int32_t* out = s.idx + r * s.k;
    for (int64_t j = 0; j < base.k; ++j) {
      const int32_t c = in[j];
      for (int64_t t = 0; t < s.spatial; ++t)
        out[j * s.spatial + t] = c < 0 ? -1 : static_cast<int32_t>(c * s.spatial + t);
    }
  }
}

int64_t gid_of(const HostSet& s, int64_t b) { return s.gid.empty() ? 0 : s.gid[b]; }

// Row of sample b in a set's idx (rows 1: the shared row).
const int32_t* row_of(const HostSet& s, int64_t b) { return s.idx + (s.rows == 1 ? 0 : b) * s.k; }

// The partition of the batch of one conv group request: group of each sample (by first appearance).
std::vector<int32_t> joint_groups(const HostSet& a, const HostSet& b, int64_t batch) {
  std::vector<int32_t> g(static_cast<size_t>(batch));
  if (a.full || a.ngroups == 1) {
    for (int64_t s = 0; s < batch; ++s) g[s] = static_cast<int32_t>(b.full ? 0 : gid_of(b, s));
  } else if (b.full || b.ngroups == 1) {
    for (int64_t s = 0; s < batch; ++s) g[s] = static_cast<int32_t>(gid_of(a, s));
  } else if (a.ngroups == b.ngroups && a.gid == b.gid) {  // the same partition (e.g. per-sample masks)
    for (int64_t s = 0; s < batch; ++s) g[s] = static_cast<int32_t>(a.gid[s]);
  } else {  // joint partition, ids by first appearance
    std::unordered_map<int64_t, int32_t> ids;
    for (int64_t s = 0; s < batch; ++s) {
      const int64_t key = gid_of(a, s) * (b.ngroups + 1) + gid_of(b, s);
      g[s] = ids.emplace(key, static_cast<int32_t>(ids.size())).first->second;
    }
  }
  return g;
}

// A distinct partition of the batch: its group ids and problem list (see GroupIndex).
struct Partition {
  std::vector<int32_t> gid, problems;
  int64_t ngroups = 1, max_group = 1;
};

Partition make_partition(std::vector<int32_t> g, int64_t batch) {
  Partition o;
  const int32_t G = *std::max_element(g.begin(), g.end()) + 1;
  std::vector<int32_t> cnt(static_cast<size_t>(G), 0);
  for (int32_t v : g) ++cnt[v];
  o.ngroups = G;
  o.max_group = *std::max_element(cnt.begin(), cnt.end());
  o.problems.resize(static_cast<size_t>(batch + 2 * G));
  std::vector<int32_t> start(static_cast<size_t>(G), 0);
  for (int32_t v = 1; v < G; ++v) start[v] = start[v - 1] + cnt[v - 1];
  std::vector<int32_t> fill = start;
  for (int64_t s = 0; s < batch; ++s) o.problems[fill[g[s]]++] = static_cast<int32_t>(s);  // stable
  for (int32_t v = 0; v < G; ++v) {
    o.problems[batch + v] = start[v];
    o.problems[batch + G + v] = cnt[v];
  }
  o.gid = std::move(g);
  return o;
}

std::vector<HostSet> resolve_sets(const RunProgram& program, const std::vector<at::Tensor>& masks, int64_t batch) {
  const int64_t nsets = static_cast<int64_t>(program.sets.size());
  std::vector<HostSet> sets(static_cast<size_t>(nsets));
  for (int64_t i = 0; i < nsets; ++i) {
    const RunProgram::Set& p = program.sets[i];
    switch (p.kind) {
      case SetKind::kUnit:
        TORCH_CHECK(p.arg >= 0 && p.arg < static_cast<int64_t>(masks.size()), "plan_run_indices: set ", i,
                    " reads mask ", p.arg, " of ", masks.size());
        sets[i] = unit_set(masks[p.arg], batch);
        break;
      case SetKind::kAll:
        sets[i].full = true;
        sets[i].channels = sets[i].k = p.arg;
        break;
      case SetKind::kFlat:
        sets[i] = flat_set(sets[p.arg], p.arg, p.spatial);
        TORCH_CHECK(sets[i].channels < INT32_MAX, "plan_run_indices: flat set ", i, " has ", sets[i].channels,
                    " features, more than int32 indices hold");
        break;
    }
  }
  return sets;
}

// Offsets of every non-full set's rows in the int32 buffer (a flat set with spatial 1 shares its base's rows);
// returns the int32 count.
int64_t layout_sets(std::vector<HostSet>& sets) {
  int64_t n32 = 0;
  for (auto& st : sets) {
    if (st.full) continue;
    if (st.base >= 0 && st.spatial == 1) {
      st.off = sets[st.base].off;
      continue;
    }
    st.off = n32;
    n32 += st.rows * st.k;
  }
  return n32;
}

void write_sets(std::vector<HostSet>& sets, int32_t* w32, int64_t batch) {
  for (auto& st : sets) {
    if (st.full) continue;
    st.idx = w32 + st.off;
    if (st.base >= 0 && st.spatial == 1) continue;
    if (st.mask != nullptr) {
      write_unit_idx(st, batch);
    } else {
      write_flat_idx(st, sets[st.base]);
    }
  }
}

// Kind and sizes of each remap; the offsets of its take (int64) and keep (uint8) in their buffers.
std::vector<RemapPlan> layout_remaps(const RunProgram& program, const std::vector<HostSet>& sets, int64_t batch,
                                     int64_t& n64, int64_t& n8) {
  std::vector<RemapPlan> remaps(program.remaps.size());
  n64 = n8 = 0;
  for (size_t i = 0; i < remaps.size(); ++i) {
    const auto [si, di] = program.remaps[i];
    const HostSet &src = sets[si], &dst = sets[di];
    RemapPlan& r = remaps[i];
    r.width = dst.k;
    if (si == di || (src.full && dst.full)) {
      r.kind = RemapKind::kSame;
    } else if (src.k == 0 || dst.k == 0) {
      r.kind = RemapKind::kZeros;
    } else {
      const bool single = (src.full || src.ngroups == 1) && (dst.full || dst.ngroups == 1);
      r.kind = single ? RemapKind::kRow : RemapKind::kRows;
      r.rows = single ? 1 : batch;
      r.take_offset = n64;
      n64 += r.rows * dst.k;
      r.keep_offset = n8;  // dropped below if every entry is present
      n8 += r.rows * dst.k;
    }
  }
  return remaps;
}

void write_remaps(const RunProgram& program, const std::vector<HostSet>& sets, std::vector<RemapPlan>& remaps,
                  int64_t* w64, uint8_t* w8) {
  std::vector<int32_t> col;
  for (size_t i = 0; i < remaps.size(); ++i) {
    RemapPlan& r = remaps[i];
    if (r.kind != RemapKind::kRow && r.kind != RemapKind::kRows) continue;
    const HostSet &src = sets[program.remaps[i].first], &dst = sets[program.remaps[i].second];
    col.assign(static_cast<size_t>(src.channels), -1);
    int64_t zeros = 0;
    for (int64_t b = 0; b < r.rows; ++b) {
      zeros += remap_row(src.full ? nullptr : row_of(src, b), src.k, dst.full ? nullptr : row_of(dst, b), dst.k,
                         src.channels, col.data(), w64 + r.take_offset + b * dst.k,
                         w8 + r.keep_offset + b * dst.k);
    }
    if (zeros == 0) r.keep_offset = -1;  // nothing to zero
  }
}

void check_program(const RunProgram& program) {
  const int64_t nsets = static_cast<int64_t>(program.sets.size());
  for (int64_t i = 0; i < nsets; ++i) {
    const RunProgram::Set& p = program.sets[i];
    TORCH_CHECK(p.kind != SetKind::kAll || (p.arg >= 0 && p.arg < INT32_MAX), "plan_run_indices: set ", i, " has ",
                p.arg, " channels");
    TORCH_CHECK(p.kind != SetKind::kFlat || (p.arg >= 0 && p.arg < i && p.spatial >= 1 && p.spatial < INT32_MAX),
                "plan_run_indices: flat set ", i, " must flatten an earlier set by 1 <= spatial < 2^31");
  }
  for (const auto& reqs : {&program.conv_groups, &program.remaps}) {
    for (const auto& [a, b] : *reqs) {
      TORCH_CHECK(a >= 0 && a < nsets && b >= 0 && b < nsets, "plan_run_indices: a request names set ", a, " or ",
                  b, " of ", nsets);
    }
  }
}

}  // namespace

int64_t RunProgram::add_unit_set(int64_t mask_index) {
  sets.push_back({SetKind::kUnit, mask_index, 1});
  return static_cast<int64_t>(sets.size()) - 1;
}

int64_t RunProgram::add_all_set(int64_t channels) {
  sets.push_back({SetKind::kAll, channels, 1});
  return static_cast<int64_t>(sets.size()) - 1;
}

int64_t RunProgram::add_flat_set(int64_t base, int64_t spatial) {
  sets.push_back({SetKind::kFlat, base, spatial});
  return static_cast<int64_t>(sets.size()) - 1;
}

int64_t RunProgram::add_conv_groups(int64_t a, int64_t b) {
  conv_groups.emplace_back(a, b);
  return static_cast<int64_t>(conv_groups.size()) - 1;
}

int64_t RunProgram::add_remap(int64_t src, int64_t dst) {
  remaps.emplace_back(src, dst);
  return static_cast<int64_t>(remaps.size()) - 1;
}

RunIndices plan_run_indices(const RunProgram& program, const std::vector<at::Tensor>& masks, int64_t batch,
                            bool pin) {
  TORCH_CHECK(batch >= 1 && batch < INT32_MAX, "plan_run_indices: batch must be in [1, 2^31), got ", batch);
  check_program(program);
  std::vector<HostSet> sets = resolve_sets(program, masks, batch);

  // conv groups: one partition (ids + problem list) per distinct grouping of the batch
  std::vector<Partition> parts;
  std::unordered_map<std::string, int64_t> part_of;  // gid bytes -> partition
  std::vector<int64_t> part_of_request;
  for (const auto& [a, b] : program.conv_groups) {
    std::vector<int32_t> g = joint_groups(sets[a], sets[b], batch);
    std::string key(reinterpret_cast<const char*>(g.data()), g.size() * sizeof(int32_t));
    auto it = part_of.find(key);
    if (it == part_of.end()) {
      it = part_of.emplace(std::move(key), static_cast<int64_t>(parts.size())).first;
      parts.push_back(make_partition(std::move(g), batch));
    }
    part_of_request.push_back(it->second);
  }

  // int32 buffer: set rows (written in place), then the partitions
  int64_t n32 = layout_sets(sets);
  std::vector<int64_t> part_off(parts.size());
  for (size_t i = 0; i < parts.size(); ++i) {
    part_off[i] = n32;
    n32 += batch + static_cast<int64_t>(parts[i].problems.size());
  }
  const auto opts = at::TensorOptions().device(at::kCPU).pinned_memory(pin);
  // + 8: the table-driven compaction stores 8 positions at a time (what lands past a row is overwritten later)
  at::Tensor i32 = at::empty({n32 + 8}, opts.dtype(at::kInt));
  int32_t* w32 = i32.data_ptr<int32_t>();
  write_sets(sets, w32, batch);
  for (size_t i = 0; i < parts.size(); ++i) {
    std::memcpy(w32 + part_off[i], parts[i].gid.data(), parts[i].gid.size() * sizeof(int32_t));
    std::memcpy(w32 + part_off[i] + batch, parts[i].problems.data(), parts[i].problems.size() * sizeof(int32_t));
  }

  int64_t n64 = 0, n8 = 0;
  RunIndices out;
  out.remaps = layout_remaps(program, sets, batch, n64, n8);
  out.i64 = at::empty({n64}, opts.dtype(at::kLong));
  out.u8 = at::empty({n8}, opts.dtype(at::kByte));
  write_remaps(program, sets, out.remaps, out.i64.data_ptr<int64_t>(), out.u8.data_ptr<uint8_t>());
  out.i32 = i32.narrow(0, 0, n32);

  for (const auto& st : sets) {
    out.sets.push_back({st.full, st.channels, st.k, st.full ? 1 : st.ngroups, st.full ? -1 : st.off,
                        st.full ? 0 : st.rows});
  }
  for (int64_t p : part_of_request) {
    out.conv_groups.push_back({part_off[p], part_off[p] + batch, parts[p].ngroups, parts[p].max_group});
  }
  return out;
}

}  // namespace gencnp_fast
