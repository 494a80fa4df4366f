// Small-batch inference helpers of the generator (src/gencnp_fast/generator/rfe.py), bound in gencnp_fast._C.
// Explaining one image runs the generator once: its cost is the count of small ATen calls, not arithmetic.
//
//   gru_sequence: the GRU recurrence h_t = GRU(x_t, h_{t-1}) over a whole sequence, torch's equations and gate
//     order (r, z, n), in one call (torch's sequence GRU issues ~15 ATen calls per step: ~110 us for 6 steps at
//     batch 1 on the 2-core VM; this is a few microseconds). For small batches: rows are independent dot products.
//   pool_units: global average and global max of every unit's feature map, written into the zero-padded
//     [L, B, width] buffer of the stacked embedding (12 ATen calls for 6 units before).
#include <torch/csrc/utils/pybind.h>

#include <ATen/ATen.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace gencnp_fast {
namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline float sigmoid(float v) { return 1.f / (1.f + std::exp(-v)); }

void check_f32(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == dim, name,
              " must be a float32 CPU tensor with ", dim, " dimensions, got ", t.scalar_type(), " ", t.sizes(),
              " on ", t.device());
}

}  // namespace

at::Tensor gru_sequence(const at::Tensor& inputs_in, const at::Tensor& h0_in, const at::Tensor& w_ih_in,
                        const at::Tensor& w_hh_in, const c10::optional<at::Tensor>& b_ih_in,
                        const c10::optional<at::Tensor>& b_hh_in) {
  check_f32(inputs_in, "gru_sequence: inputs", 3);
  check_f32(h0_in, "gru_sequence: h0", 2);
  check_f32(w_ih_in, "gru_sequence: w_ih", 2);
  check_f32(w_hh_in, "gru_sequence: w_hh", 2);
  const int64_t T = inputs_in.size(0), B = inputs_in.size(1), I = inputs_in.size(2), H = h0_in.size(1);
  TORCH_CHECK(h0_in.size(0) == B, "gru_sequence: h0 must be [B, H] with B = ", B, ", got ", h0_in.sizes());
  TORCH_CHECK(w_ih_in.size(0) == 3 * H && w_ih_in.size(1) == I, "gru_sequence: w_ih must be [3H, I] = [", 3 * H,
              ", ", I, "], got ", w_ih_in.sizes());
  TORCH_CHECK(w_hh_in.size(0) == 3 * H && w_hh_in.size(1) == H, "gru_sequence: w_hh must be [3H, H] = [", 3 * H,
              ", ", H, "], got ", w_hh_in.sizes());
  const bool has_bias = b_ih_in.has_value() && b_ih_in->defined();
  TORCH_CHECK(has_bias == (b_hh_in.has_value() && b_hh_in->defined()), "gru_sequence: give both biases or none");
  at::Tensor b_ih, b_hh;
  if (has_bias) {
    check_f32(*b_ih_in, "gru_sequence: b_ih", 1);
    check_f32(*b_hh_in, "gru_sequence: b_hh", 1);
    TORCH_CHECK(b_ih_in->size(0) == 3 * H && b_hh_in->size(0) == 3 * H, "gru_sequence: biases must be [3H]");
    b_ih = b_ih_in->contiguous();
    b_hh = b_hh_in->contiguous();
  }
  const at::Tensor x = inputs_in.contiguous(), h0 = h0_in.contiguous();
  const at::Tensor w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  at::Tensor out = at::empty({T, B, H}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wi = w_ih.data_ptr<float>();
  const float* wh = w_hh.data_ptr<float>();
  const float* bi = has_bias ? b_ih.data_ptr<float>() : nullptr;
  const float* bh = has_bias ? b_hh.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  std::vector<float> h(H), gi(3 * H), gh(3 * H);
  for (int64_t b = 0; b < B; ++b) {
    std::copy(h0.data_ptr<float>() + b * H, h0.data_ptr<float>() + (b + 1) * H, h.begin());
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = xp + (t * B + b) * I;
      for (int64_t i = 0; i < 3 * H; ++i) {
        gi[i] = (bi ? bi[i] : 0.f) + dot(wi + i * I, xt, I);
        gh[i] = (bh ? bh[i] : 0.f) + dot(wh + i * H, h.data(), H);
      }
      float* ot = op + (t * B + b) * H;
      for (int64_t k = 0; k < H; ++k) {
        const float r = sigmoid(gi[k] + gh[k]);
        const float z = sigmoid(gi[H + k] + gh[H + k]);
        const float n = std::tanh(gi[2 * H + k] + r * gh[2 * H + k]);
        h[k] = (1.f - z) * n + z * h[k];
        ot[k] = h[k];
      }
    }
  }
  return out;
}

void pool_units(const std::vector<at::Tensor>& features, at::Tensor& pooled) {
  check_f32(pooled, "pool_units: pooled", 3);
  TORCH_CHECK(pooled.is_contiguous(), "pool_units: pooled must be contiguous");
  TORCH_CHECK(static_cast<int64_t>(features.size()) == pooled.size(0), "pool_units: ", features.size(),
              " feature maps for a buffer of ", pooled.size(0), " units");
  const int64_t B = pooled.size(1), width = pooled.size(2);
  float* po = pooled.data_ptr<float>();
  for (size_t l = 0; l < features.size(); ++l) {
    const at::Tensor& f_in = features[l];
    TORCH_CHECK(f_in.device().is_cpu() && f_in.scalar_type() == at::kFloat && f_in.dim() >= 2 &&
                    f_in.size(0) == B,
                "pool_units: feature map ", l, " must be a float32 CPU tensor [B, C, ...] with B = ", B, ", got ",
                f_in.scalar_type(), " ", f_in.sizes());
    const at::Tensor f = f_in.contiguous();
    const int64_t C = f.size(1), n = f.numel() / std::max<int64_t>(B * C, 1);
    TORCH_CHECK(2 * C <= width, "pool_units: feature map ", l, " has ", C, " channels, the buffer holds ",
                width / 2);
    const float* fp = f.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      float* row = po + (static_cast<int64_t>(l) * B + b) * width;
      for (int64_t c = 0; c < C; ++c) {
        const float* v = fp + (b * C + c) * n;
        if (f.dim() == 2) {  // a vector: itself twice
          row[c] = row[C + c] = v[0];
          continue;
        }
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < n; ++i) s += v[i];
        // the maximum in 16 independent lanes (vectorised), NaN propagating as in torch.amax
        float lanes[16];
        std::fill(lanes, lanes + 16, v[0]);
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) {
          for (int q = 0; q < 16; ++q) lanes[q] = nanmax(lanes[q], v[i + q]);
        }
        float m = v[0];
        for (int q = 0; q < 16; ++q) m = nanmax(m, lanes[q]);
        for (; i < n; ++i) m = nanmax(m, v[i]);
        row[c] = s / static_cast<float>(n);
        row[C + c] = m;
      }
    }
  }
}

}  // namespace gencnp_fast
