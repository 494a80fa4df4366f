// Small helpers shared by the compiled ops' argument checks and CPU loops.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace gencnp_fast {

// An int[2] argument given as 1 or 2 values, each >= lo: "<op>: <name> must ..." otherwise (op ends in ": ").
inline void pair_arg(at::IntArrayRef v, const char* op, const char* name, int64_t lo, int64_t& a, int64_t& b) {
  TORCH_CHECK(v.size() == 1 || v.size() == 2, op, name, " must have 1 or 2 values, got ", v.size());
  a = v[0];
  b = v.size() == 1 ? v[0] : v[1];
  TORCH_CHECK(a >= lo && b >= lo, op, name, " must be >= ", lo, ", got ", v);
}

// a where a > b or a is NaN, else b: NaN from either side propagates as in torch's max ops (branch-free, so the
// loops that use it vectorise).
inline float nanmax(float a, float b) { return ((a > b) | (a != a)) ? a : b; }

}  // namespace gencnp_fast
