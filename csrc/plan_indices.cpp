// Host planning of one run of a plan (gencnp_fast.plan.engine._Sets.prepare_compiled): every channel set, conv
// group, kernel problem list and re-compaction index a forward reads, computed in one call from the masks.
//
// Registered as torch.ops.gencnp_fast_host.plan_indices (host code, one catch-all kernel; its own namespace,
// since it is planning and not a kernel every device must have):
//
//   plan_indices(Tensor[] masks, int[] program, int batch, bool pin) -> (Tensor i32, Tensor i64, Tensor u8, Tensor meta)
//
// masks: uint8 [rows, C] each (rows = 1: one mask for the batch, or rows = batch), 0/1.
// program (int64): [nsets, ngroups, nremaps, then 3 per set, 2 per group request, 2 per remap request]
//   set    (0, mask index, 0)          a unit's mask
//          (1, channels, 0)            every channel kept
//          (2, base set, spatial)      the flattened features of an earlier set (channel c -> c * spatial + s)
//   group  (set a, set b)              the groups of samples sharing both sets' rows (a conv from a to b)
//   remap  (src set, dst set)          re-compaction of a tensor stored for src to dst
// Output buffers (pinned when pin, for one asynchronous copy each):
//   i32: per non-full set its idx rows (1 row if one group, else `batch` rows) x k, ascending channels then -1;
//        per distinct partition of the batch its group ids [batch] and problem list [batch + 2G] (samples sorted
//        by group, group starts, group sizes);
//   i64: per remap its take (1 or `batch` rows x dst width) and the columns to zero (one-row remaps);
//   u8:  per many-row remap with zeros its keep mask [batch, dst width].
// meta (int64): per set (full, k, ngroups, i32 offset, rows); per group request (gid offset, problems offset,
//   ngroups, largest group); per remap (kind 0 same / 1 zeros / 2 one row / 3 rows, width, take offset,
//   take rows, cols offset, cols count, keep offset or -1).
// The semantics are those of channel_sets.ChannelSet.from_mask / flattened, conv_groups, group_table and
// remap_index; tests/test_host_planning.py checks the two paths give bit-identical forwards.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "compact_masks.h"  // the row helpers (grouping, compaction, re-compaction indices)

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
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
              "plan_indices: masks must be contiguous uint8 [rows, C] CPU tensors, got ", mask.sizes());
  const int64_t rows = mask.size(0), C = mask.size(1);
  TORCH_CHECK(rows == 1 || rows == batch, "plan_indices: a mask has ", rows, " rows, batch is ", batch);
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

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> plan_indices(const std::vector<at::Tensor>& masks,
                                                                        at::IntArrayRef program, int64_t batch,
                                                                        bool pin) {
  TORCH_CHECK(batch >= 1, "plan_indices: batch must be >= 1");
  TORCH_CHECK(program.size() >= 3, "plan_indices: program too short");
  const int64_t nsets = program[0], ngr = program[1], nrm = program[2];
  TORCH_CHECK(nsets >= 0 && ngr >= 0 && nrm >= 0 &&
                  static_cast<int64_t>(program.size()) == 3 + 3 * nsets + 2 * ngr + 2 * nrm,
              "plan_indices: program has ", program.size(), " entries for ", nsets, " sets, ", ngr, " groups and ",
              nrm, " remaps");
  const int64_t* p = program.data() + 3;

  // ---- sets
  std::vector<HostSet> sets(static_cast<size_t>(nsets));
  for (int64_t i = 0; i < nsets; ++i, p += 3) {
    if (p[0] == 0) {
      TORCH_CHECK(p[1] >= 0 && p[1] < static_cast<int64_t>(masks.size()), "plan_indices: bad mask index ", p[1]);
      sets[i] = unit_set(masks[p[1]], batch);
    } else if (p[0] == 1) {
      sets[i].full = true;
      sets[i].channels = sets[i].k = p[1];
    } else {
      TORCH_CHECK(p[0] == 2 && p[1] >= 0 && p[1] < i && p[2] >= 1, "plan_indices: bad set entry ", i);
      sets[i] = flat_set(sets[p[1]], p[1], p[2]);
    }
  }

  // ---- sizes, then buffers
  struct GroupOut {
    std::vector<int32_t> gid;
    int64_t ngroups = 1, max_cnt = 1;
    std::vector<int32_t> problems;
  };
  std::vector<GroupOut> parts;
  std::unordered_map<std::string, int64_t> part_of;  // gid bytes -> partition
  std::vector<int64_t> group_part(static_cast<size_t>(ngr));
  for (int64_t i = 0; i < ngr; ++i, p += 2) {
    TORCH_CHECK(p[0] >= 0 && p[0] < nsets && p[1] >= 0 && p[1] < nsets, "plan_indices: bad group request ", i);
    const HostSet &a = sets[p[0]], &b = sets[p[1]];
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
        auto it = ids.emplace(key, static_cast<int32_t>(ids.size())).first;
        g[s] = it->second;
      }
    }
    std::string key(reinterpret_cast<const char*>(g.data()), g.size() * sizeof(int32_t));
    auto it = part_of.find(key);
    if (it == part_of.end()) {
      GroupOut o;
      const int32_t G = *std::max_element(g.begin(), g.end()) + 1;
      std::vector<int32_t> cnt(static_cast<size_t>(G), 0);
      for (int32_t v : g) ++cnt[v];
      o.ngroups = G;
      o.max_cnt = *std::max_element(cnt.begin(), cnt.end());
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
      it = part_of.emplace(std::move(key), static_cast<int64_t>(parts.size())).first;
      parts.push_back(std::move(o));
    }
    group_part[i] = it->second;
  }

  // ---- int32 output: set idx (written in place), then the partitions
  int64_t n32 = 0;
  for (auto& st : sets) {
    if (st.full) continue;
    if (st.base >= 0 && st.spatial == 1) {  // the same features: share the base's rows
      st.off = sets[st.base].off;
      continue;
    }
    st.off = n32;
    n32 += st.rows * st.k;
  }
  std::vector<int64_t> part_off(parts.size());
  for (size_t i = 0; i < parts.size(); ++i) {
    part_off[i] = n32;
    n32 += batch + static_cast<int64_t>(parts[i].problems.size());
  }
  auto opts = at::TensorOptions().device(at::kCPU).pinned_memory(pin);
  // + 8: the table-driven compaction stores 8 positions at a time (what lands past a row is overwritten later)
  at::Tensor i32 = at::empty({n32 + 8}, opts.dtype(at::kInt));
  int32_t* w32 = i32.data_ptr<int32_t>();
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
  for (size_t i = 0; i < parts.size(); ++i) {
    std::memcpy(w32 + part_off[i], parts[i].gid.data(), parts[i].gid.size() * sizeof(int32_t));
    std::memcpy(w32 + part_off[i] + batch, parts[i].problems.data(), parts[i].problems.size() * sizeof(int32_t));
  }

  // ---- re-compactions: kinds and sizes, then take / cols (int64) and keep (uint8) written in place
  struct RemapOut {
    int64_t kind = 0, width = 0, rows = 0, take_off = 0, cols_off = 0, ncols = 0, keep_off = -1;
  };
  std::vector<RemapOut> remaps(static_cast<size_t>(nrm));
  std::vector<std::pair<int64_t, int64_t>> remap_sets(static_cast<size_t>(nrm));
  int64_t n64 = 0, n8 = 0;
  for (int64_t i = 0; i < nrm; ++i, p += 2) {
    TORCH_CHECK(p[0] >= 0 && p[0] < nsets && p[1] >= 0 && p[1] < nsets, "plan_indices: bad remap request ", i);
    remap_sets[i] = {p[0], p[1]};
    const HostSet &src = sets[p[0]], &dst = sets[p[1]];
    RemapOut& r = remaps[i];
    r.width = dst.k;
    if (p[0] == p[1] || (src.full && dst.full)) {
      r.kind = 0;
    } else if (src.k == 0 || dst.k == 0) {
      r.kind = 1;
    } else {
      const bool single = (src.full || src.ngroups == 1) && (dst.full || dst.ngroups == 1);
      r.kind = single ? 2 : 3;
      r.rows = single ? 1 : batch;
      r.take_off = n64;
      n64 += r.rows * dst.k;
      if (single) {
        r.cols_off = n64;
        n64 += dst.k;  // room for every column; ncols says how many are used
      } else {
        r.keep_off = n8;
        n8 += batch * dst.k;
      }
    }
  }
  at::Tensor i64 = at::empty({n64}, opts.dtype(at::kLong));
  at::Tensor u8 = at::empty({n8}, opts.dtype(at::kByte));
  int64_t* w64 = i64.data_ptr<int64_t>();
  uint8_t* w8 = u8.data_ptr<uint8_t>();
  std::vector<int32_t> col;
  for (int64_t i = 0; i < nrm; ++i) {
    RemapOut& r = remaps[i];
    if (r.kind < 2) continue;
    const HostSet &src = sets[remap_sets[i].first], &dst = sets[remap_sets[i].second];
    col.assign(static_cast<size_t>(src.channels), -1);
    int64_t zeros = 0;
    for (int64_t b = 0; b < r.rows; ++b) {
      zeros += remap_row(src.full ? nullptr : row_of(src, b), src.k, dst.full ? nullptr : row_of(dst, b), dst.k,
                         src.channels, col.data(), w64 + r.take_off + b * dst.k,
                         r.kind == 3 ? w8 + r.keep_off + b * dst.k : nullptr,
                         r.kind == 2 ? w64 + r.cols_off : nullptr);
    }
    if (r.kind == 2) r.ncols = zeros;
    if (r.kind == 3 && zeros == 0) r.keep_off = -1;  // nothing to zero: no multiply
  }

  // ---- layout
  at::Tensor meta = at::empty({5 * nsets + 4 * ngr + 7 * nrm}, at::TensorOptions().dtype(at::kLong));
  int64_t* mt = meta.data_ptr<int64_t>();
  for (const auto& st : sets) {
    *mt++ = st.full;
    *mt++ = st.k;
    *mt++ = st.full ? 1 : st.ngroups;
    *mt++ = st.full ? -1 : st.off;
    *mt++ = st.full ? 0 : st.rows;
  }
  for (int64_t i = 0; i < ngr; ++i) {
    const auto& o = parts[group_part[i]];
    *mt++ = part_off[group_part[i]];
    *mt++ = part_off[group_part[i]] + batch;
    *mt++ = o.ngroups;
    *mt++ = o.max_cnt;
  }
  for (const auto& r : remaps) {
    *mt++ = r.kind;
    *mt++ = r.width;
    *mt++ = r.take_off;
    *mt++ = r.rows;
    *mt++ = r.cols_off;
    *mt++ = r.ncols;
    *mt++ = r.keep_off;
  }
  return {i32.narrow(0, 0, n32), i64, u8, meta};
}

}  // namespace gencnp_fast

// A catch-all kernel (host code on CPU tensors; also runs for a plan without masks, i.e. an empty list).
TORCH_LIBRARY(gencnp_fast_host, m) {
  m.def("plan_indices(Tensor[] masks, int[] program, int batch, bool pin) -> (Tensor, Tensor, Tensor, Tensor)",
        &gencnp_fast::plan_indices);
}
