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
#include "compact_masks.h"

#include <cstring>
#include <unordered_map>
#include <vector>

namespace gencnp_fast {

namespace {

// FNV-1a over 8-byte words of a 0/1 row, and its popcount (the bytes are 0 or 1, so a word's byte sum is its
// count of kept channels).
inline uint64_t hash_and_count(const uint8_t* row, int64_t C, int64_t* count) {
  uint64_t h = 1469598103934665603ull;
  int64_t cnt = 0;
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    uint64_t w;
    std::memcpy(&w, row + c, 8);
    h = (h ^ w) * 1099511628211ull;
    cnt += static_cast<int64_t>((w * 0x0101010101010101ull) >> 56);
  }
  for (; c < C; ++c) {
    h = (h ^ row[c]) * 1099511628211ull;
    cnt += row[c];
  }
  *count = cnt;
  return h;
}

}  // namespace

CompactResult compact_masks(const uint8_t* mask, int64_t B, int64_t C, int32_t* idx, int64_t* gid, int64_t* counts) {
  std::vector<uint8_t> norm(static_cast<size_t>(B * C));
  for (int64_t i = 0; i < B * C; ++i) norm[i] = mask[i] != 0;  // vectorised; torch bools are 0/1 already
  std::unordered_map<uint64_t, std::vector<int64_t>> reps;  // hash -> first row of each group with that hash
  reps.reserve(static_cast<size_t>(B) * 2);
  std::vector<int64_t> first_of_group;
  int64_t k = 0;
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* row = norm.data() + b * C;
    int64_t cnt;
    const uint64_t h = hash_and_count(row, C, &cnt);
    counts[b] = cnt;
    k = cnt > k ? cnt : k;
    auto& bucket = reps[h];
    int64_t found = -1;
    for (int64_t r : bucket) {
      if (std::memcmp(norm.data() + r * C, row, static_cast<size_t>(C)) == 0) {
        found = gid[r];
        break;
      }
    }
    if (found < 0) {
      found = static_cast<int64_t>(first_of_group.size());
      first_of_group.push_back(b);
      bucket.push_back(b);
    }
    gid[b] = found;
  }
  std::vector<int32_t> tmp(static_cast<size_t>(C) + 1);
  for (int64_t b = 0; b < B; ++b) {
    int32_t* out = idx + b * k;
    const int64_t rep = first_of_group[gid[b]];
    if (rep != b) {  // rep < b: its row is already written
      std::memcpy(out, idx + rep * k, static_cast<size_t>(k) * sizeof(int32_t));
      continue;
    }
    const uint8_t* row = norm.data() + b * C;
    int64_t j = 0;
    for (int64_t c = 0; c < C; ++c) {  // branch-free: write every channel, advance past the kept ones
      tmp[j] = static_cast<int32_t>(c);
      j += row[c];
    }
    std::memcpy(out, tmp.data(), static_cast<size_t>(j) * sizeof(int32_t));
    for (; j < k; ++j) out[j] = -1;
  }
  return {k, static_cast<int64_t>(first_of_group.size())};
}

}  // namespace gencnp_fast

namespace gencnp_fast {

// Re-compaction indices (gencnp_fast.plan.channel_sets.remap_index): for every row b and column j of dst,
// take[b, j] = the column of src's row b that holds channel dst[b, j], keep[b, j] = 1; where dst[b, j] is padding
// (-1) or a channel src's row does not hold, take = 0 and keep = 0. Rows hold ascending channels then -1 padding.
// One channel -> column table of C entries, reused across rows: O(B * (Ks + Kd)). Returns the number of zeros.
int64_t remap_positions(const int32_t* src, const int32_t* dst, int64_t B, int64_t Ks, int64_t Kd, int64_t C,
                        int64_t* take, uint8_t* keep) {
  std::vector<int32_t> col(static_cast<size_t>(C), -1);
  int64_t zeros = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int32_t* s = src + b * Ks;
    const int32_t* d = dst + b * Kd;
    for (int64_t j = 0; j < Ks && s[j] >= 0; ++j) {
      if (s[j] < C) col[s[j]] = static_cast<int32_t>(j);
    }
    for (int64_t j = 0; j < Kd; ++j) {
      const int32_t c = d[j];
      const int32_t p = (c >= 0 && c < C) ? col[c] : -1;
      take[b * Kd + j] = p >= 0 ? p : 0;
      keep[b * Kd + j] = p >= 0 ? 1 : 0;
      zeros += p < 0;
    }
    for (int64_t j = 0; j < Ks && s[j] >= 0; ++j) {
      if (s[j] < C) col[s[j]] = -1;
    }
  }
  return zeros;
}

}  // namespace gencnp_fast
