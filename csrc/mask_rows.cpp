// Row helpers of the run index planner (csrc/run_indices.cpp): exact grouping of mask rows, counting and
// table-driven compaction of a 0/1 row, re-compaction indices of one row into another. Rows hold 1-byte 0/1 truth
// values; compacted rows hold ascending channels, then -1 padding.
#include "mask_rows.h"

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
                  int64_t* take, uint8_t* keep) {
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
    zeros += q < 0;
  }
  if (s)
    for (int64_t j = 0; j < Ks && s[j] >= 0; ++j)
      if (s[j] < C) col[s[j]] = -1;
  return zeros;
}

}  // namespace gencnp_fast
