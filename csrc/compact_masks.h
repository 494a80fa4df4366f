#pragma once
#include <cstdint>

namespace gencnp_fast {

struct CompactResult {
  int64_t k;        // columns of idx (max kept count over rows)
  int64_t ngroups;  // distinct rows
};

// See compact_masks.cpp. idx must hold B * C int32 (only the first B * K are written).
CompactResult compact_masks(const uint8_t* mask, int64_t B, int64_t C, int32_t* idx, int64_t* gid, int64_t* counts);

}  // namespace gencnp_fast
