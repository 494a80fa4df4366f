#pragma once
#include <cstdint>

namespace gencnp_fast {

struct CompactResult {
  int64_t k;        // columns of idx (max kept count over rows)
  int64_t ngroups;  // distinct rows
};

// See compact_masks.cpp. idx must hold B * C int32 (only the first B * K are written).
CompactResult compact_masks(const uint8_t* mask, int64_t B, int64_t C, int32_t* idx, int64_t* gid, int64_t* counts);

// See compact_masks.cpp: re-compaction indices of rows dst [B, Kd] into rows src [B, Ks]; returns the zero count.
int64_t remap_positions(const int32_t* src, const int32_t* dst, int64_t B, int64_t Ks, int64_t Kd, int64_t C,
                        int64_t* take, uint8_t* keep);

}  // namespace gencnp_fast
