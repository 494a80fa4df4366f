// Host-side mask compaction for the CPU engine (gencnp_fast.plan.channel_sets.ChannelSet.from_mask).
//
// Not a dispatcher op: it works on host buffers (numpy views of CPU tensors) and runs once per unit and
// forward, so it is exposed as a plain function of the _C module (see module.cpp).
//
// Input: a [B, C] mask of 1-byte truth values (nonzero = kept). Output, written into caller buffers:
//   idx    int32 [B * K] row-major, K = max kept count: kept channels of each row ascending, then -1;
//   gid    int64 [B]: group id of each row, equal rows share one, numbered by first appearance;
//   counts int64 [B]: kept channels per row.
// Returns (K, number of groups). Rows are grouped exactly (hash, then byte comparison); each distinct row is
// compacted once and copied to the other rows of its group.
//
// The row helpers below (grouping, counting, table-driven compaction, re-compaction indices) also serve the host
// planner, csrc/plan_indices.cpp.
#include "compact_masks.h"

#include <cstring>
#include <unordered_map>
#include <vector>

namespace gencnp_fast {

namespace {

// FNV-1a over 8-byte words of a row.
uint64_t hash_row(const uint8_t* row, int64_t C) {
  uint64_t h = 1469598103934665603ull;
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    uint64_t w;
    std::memcpy(&w, row + c, 8);
    h = (h ^ w) * 1099511628211ull;
  }
  for (; c < C; ++c) h = (h ^ row[c]) * 1099511628211ull;
  return h;
}

// The 8 bits of 8 bytes that are each 0 or 1 (byte i -> bit i).
inline uint32_t bits8(const uint8_t* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  return static_cast<uint32_t>(((w & 0x0101010101010101ull) * 0x0102040810204080ull) >> 56) & 0xffu;
}

// For every byte value v, the positions of its set bits (padded with 0) and their count.
struct BitLut {
  int32_t pos[256][8];
  int32_t cnt[256];
  BitLut() {
    for (int v = 0; v < 256; ++v) {
      int n = 0;
      for (int b = 0; b < 8; ++b)
        if (v >> b & 1) pos[v][n++] = b;
      for (int b = n; b < 8; ++b) pos[v][b] = 0;
      cnt[v] = n;
    }
  }
};
const BitLut kLut;

}  // namespace

int64_t count_row(const uint8_t* row, int64_t C) {
  int64_t n = 0, c = 0;
  for (; c + 8 <= C; c += 8) n += kLut.cnt[bits8(row + c)];
  for (; c < C; ++c) n += row[c] != 0;
  return n;
}

int64_t compact_row(const uint8_t* row, int64_t C, int32_t* out) {
  int64_t j = 0, c = 0;
  for (; c + 8 <= C; c += 8) {  // 8 channels per step: the byte pattern's positions from a table, 8 stores
    const uint32_t v = bits8(row + c);
    const int32_t* p = kLut.pos[v];
    for (int t = 0; t < 8; ++t) out[j + t] = static_cast<int32_t>(c) + p[t];
    j += kLut.cnt[v];
  }
  for (; c < C; ++c)
    if (row[c]) out[j++] = static_cast<int32_t>(c);
  return j;
}

int64_t group_rows(const uint8_t* m, int64_t rows, int64_t C, std::vector<int64_t>& gid, std::vector<int64_t>& first) {
  gid.assign(static_cast<size_t>(rows), 0);
  first.clear();
  std::unordered_map<uint64_t, int64_t> head;  // hash -> latest group with it; next_same: the earlier ones
  head.reserve(static_cast<size_t>(rows) * 2);
  std::vector<int64_t> next_same;
  for (int64_t b = 0; b < rows; ++b) {
    const uint8_t* row = m + b * C;
    auto ins = head.emplace(hash_row(row, C), -1);
    int64_t found = -1;
    for (int64_t g = ins.first->second; g >= 0; g = next_same[g]) {
      if (std::memcmp(m + first[g] * C, row, static_cast<size_t>(C)) == 0) {
        found = g;
        break;
      }
    }
    if (found < 0) {
      found = static_cast<int64_t>(first.size());
      first.push_back(b);
      next_same.push_back(ins.first->second);
      ins.first->second = found;
    }
    gid[b] = found;
  }
  return static_cast<int64_t>(first.size());
}

int64_t remap_row(const int32_t* s, int64_t Ks, const int32_t* d, int64_t Kd, int64_t C, int32_t* col,
                  int64_t* take, uint8_t* keep, int64_t* cols) {
  if (s)
    for (int64_t j = 0; j < Ks && s[j] >= 0; ++j)
      if (s[j] < C) col[s[j]] = static_cast<int32_t>(j);
  int64_t zeros = 0;
  for (int64_t j = 0; j < Kd; ++j) {
    const int32_t c = d ? d[j] : static_cast<int32_t>(j);
    int32_t q = -1;
    if (c >= 0 && c < C) q = s ? col[c] : c;
    take[j] = q >= 0 ? q : 0;
    if (keep) keep[j] = q >= 0;
    if (q < 0) {
      if (cols) cols[zeros] = j;
      ++zeros;
    }
  }
  if (s)
    for (int64_t j = 0; j < Ks && s[j] >= 0; ++j)
      if (s[j] < C) col[s[j]] = -1;
  return zeros;
}

CompactResult compact_masks(const uint8_t* mask, int64_t B, int64_t C, int32_t* idx, int64_t* gid, int64_t* counts) {
  std::vector<uint8_t> norm(static_cast<size_t>(B * C));
  for (int64_t i = 0; i < B * C; ++i) norm[i] = mask[i] != 0;  // vectorised; torch bools are 0/1 already
  std::vector<int64_t> g, first;
  const int64_t G = group_rows(norm.data(), B, C, g, first);
  std::vector<int64_t> cnt(static_cast<size_t>(G));
  int64_t k = 0;
  for (int64_t i = 0; i < G; ++i) {
    cnt[i] = count_row(norm.data() + first[i] * C, C);
    k = cnt[i] > k ? cnt[i] : k;
  }
  std::vector<int32_t> tmp(static_cast<size_t>(C) + 8);
  for (int64_t b = 0; b < B; ++b) {
    gid[b] = g[b];
    counts[b] = cnt[g[b]];
    int32_t* out = idx + b * k;
    const int64_t rep = first[g[b]];
    if (rep != b) {  // rep < b: its row is already written
      std::memcpy(out, idx + rep * k, static_cast<size_t>(k) * sizeof(int32_t));
      continue;
    }
    const int64_t j = compact_row(norm.data() + b * C, C, tmp.data());  // tmp: room for the 8-wide stores
    std::memcpy(out, tmp.data(), static_cast<size_t>(j) * sizeof(int32_t));
    for (int64_t t = j; t < k; ++t) out[t] = -1;
  }
  return {k, G};
}

// Re-compaction indices (gencnp_fast.plan.channel_sets.remap_index): for every row b and column j of dst,
// take[b, j] = the column of src's row b that holds channel dst[b, j], keep[b, j] = 1; where dst[b, j] is padding
// (-1) or a channel src's row does not hold, take = 0 and keep = 0. Rows hold ascending channels then -1 padding.
// One channel -> column table of C entries, reused across rows: O(B * (Ks + Kd)). Returns the number of zeros.
int64_t remap_positions(const int32_t* src, const int32_t* dst, int64_t B, int64_t Ks, int64_t Kd, int64_t C,
                        int64_t* take, uint8_t* keep) {
  std::vector<int32_t> col(static_cast<size_t>(C), -1);
  int64_t zeros = 0;
  for (int64_t b = 0; b < B; ++b)
    zeros += remap_row(src + b * Ks, Ks, dst + b * Kd, Kd, C, col.data(), take + b * Kd, keep + b * Kd, nullptr);
  return zeros;
}

}  // namespace gencnp_fast
