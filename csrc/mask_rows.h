#pragma once
// Row helpers of the run index planner (csrc/run_indices.cpp). Rows hold 1-byte 0/1 truth values.
#include <cstdint>
#include <vector>

namespace gencnp_fast {

// Exact grouping of the rows of a [rows, C] 0/1 mask (hash, then byte comparison): gid per row, numbered by first
// appearance, and the first row of each group. Returns the number of groups.
int64_t group_rows(const uint8_t* m, int64_t rows, int64_t C, std::vector<int64_t>& gid, std::vector<int64_t>& first);

// Kept channels of a 0/1 row.
int64_t count_row(const uint8_t* row, int64_t C);

// Ascending kept channels of a 0/1 row into out, which must have room for the count + 8 (8 positions are stored
// at a time); returns the count.
int64_t compact_row(const uint8_t* row, int64_t C, int32_t* out);

// One row of re-compaction indices: for each dst column j (channel d[j]; d null: dst keeps every channel, so j),
// the column of the src row holding it (s null: src keeps every channel) into take[j] with keep[j] = 1, else 0 and
// 0. col: C entries of -1 (left so). keep may be null. Returns the number not found.
int64_t remap_row(const int32_t* s, int64_t Ks, const int32_t* d, int64_t Kd, int64_t C, int32_t* col,
                  int64_t* take, uint8_t* keep);

}  // namespace gencnp_fast
