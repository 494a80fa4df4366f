// CPU kernel of gencnp_fast::max_pool2d (schema in csrc/ops.cpp): F.max_pool2d (no dilation, no ceil mode) on a
// float32 NCHW tensor, the pooling steps of a plan on compacted activations.
//
//   out[b, c, oh, ow] = max over r < kh, s < kw of x[b, c, oh*sh - ph + r, ow*sw - pw + s]   (taps outside: skipped)
//
// One task per output row, spread over the threads: the elementwise maxima of its kh input rows (contiguous,
// vectorised) into a row buffer, then the maxima along that row (AVX-512: 16 outputs of a stride-2 pool from the
// even / odd lanes of 32 inputs). NaN propagates as in F.max_pool2d. On the 2-core VM, ResNet-50's 3x3
// stride-2 stem pool on [8, 16, 112, 112]: 0.23 ms, against 2.0 ms for the strided-slice maxima and 8.7 ms for
// torch's NCHW CPU kernel. The arguments are checked once for both implementations (csrc/max_pool2d.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"
#include "../max_pool2d.h"

#include <algorithm>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace gencnp_fast {
namespace {

#if defined(__AVX512F__)
// a where a > b or a is NaN, else b, on 16 lanes (_mm512_max_ps alone would drop a NaN in a)
inline __m512 nanmax16(__m512 a, __m512 b) {
  return _mm512_mask_mov_ps(_mm512_max_ps(a, b), _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), a);
}
#endif

// The maxima along one row: col[ow] = max over s < kw of row[ow*sw - pw + s] (taps inside [0, W)). ``row`` may be
// read up to 34 floats past row[W - 1] (the caller pads its buffer).
void row_maxima(const float* row, int64_t W, int64_t Wo, int64_t kw, int64_t sw, int64_t pw, float* col) {
  // interior outputs: the whole window inside the row, no bounds per tap
  const int64_t first = std::min(Wo, (pw + sw - 1) / sw);                                   // ow*sw - pw >= 0
  const int64_t last = std::max(first, std::min(Wo, W + pw - kw >= 0 ? (W + pw - kw) / sw + 1 : 0));  // + kw <= W
  auto edge = [&](int64_t ow) {
    const int64_t w0 = ow * sw - pw, lo = std::max<int64_t>(w0, 0), hi = std::min(w0 + kw, W);
    float m = row[lo];
    for (int64_t w = lo + 1; w < hi; ++w) m = nanmax(m, row[w]);
    col[ow] = m;
  };
  for (int64_t ow = 0; ow < first; ++ow) edge(ow);
  int64_t ow = first;
#if defined(__AVX512F__)
  if (sw == 2 && (kw == 2 || kw == 3)) {  // the common pools: 16 outputs from even / odd lanes of 32 inputs
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    for (; ow + 16 <= last; ow += 16) {
      const float* r = row + (2 * ow - pw);
      const __m512 a = _mm512_loadu_ps(r), b = _mm512_loadu_ps(r + 16);
      __m512 m = nanmax16(_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b));
      if (kw == 3) {
        const __m512 c = _mm512_loadu_ps(r + 2), d = _mm512_loadu_ps(r + 18);
        m = nanmax16(m, _mm512_permutex2var_ps(c, even, d));
      }
      _mm512_storeu_ps(col + ow, m);
    }
  }
#endif
  for (; ow < last; ++ow) {
    const float* r = row + (ow * sw - pw);
    float m = r[0];
    for (int64_t s = 1; s < kw; ++s) m = nanmax(m, r[s]);
    col[ow] = m;
  }
  for (ow = last; ow < Wo; ++ow) edge(ow);
}

#if defined(__AVX512F__)
// 2x2 stride-2 pools (VGG's) on maps of even H and W = 2, 4, 8, 16 or 32: the input read as rows of pairs of input
// rows (row n at x + 2 n W, across planes: H is even), m[n W + w] = max(x[2 n W + w], x[2 n W + W + w]), and
// out[k] = max(m[2 k], m[2 k + 1]) over the whole tensor at once (W even: no pair crosses a row). A block of 16 m
// values lies in one row (W = 16, 32: two loads) or spans 16 / W rows, which are 32 consecutive inputs (one
// two-source permute per half); two blocks give 16 outputs. The row-by-row path pays a fixed cost per output row:
// VGG-16-BN's pools at batch 64 took 0.13-0.28 ms each (W = 32 ... 4) against 0.01-0.04 ms here (op level, warm).
// Wider rows keep the row path, which reads each input row in order: in a VGG-16 224^2 batch-8 run its pool of
// 224-float rows (input 26 MB, from memory) took 1.1 ms against 1.85 ms for this path's two interleaved row streams,
// and on 112-float rows the two were within 10 %.
bool pool_2x2_flat(const float* x, float* out, int64_t planes, int64_t H, int64_t W) {
  if (H % 2 != 0 || !(W == 2 || W == 4 || W == 8 || W == 16 || W == 32)) return false;
  const int64_t M = planes * (H / 2) * W;  // m values
  const int64_t blocks = M / 32;            // 16 outputs each
  alignas(64) int32_t top[16];
  for (int l = 0; l < 16; ++l) top[l] = static_cast<int32_t>(W < 16 ? (l / W) * 2 * W + l % W : l);
  const __m512i itop = _mm512_load_si512(top);
  const __m512i ibot = _mm512_add_epi32(itop, _mm512_set1_epi32(static_cast<int32_t>(W < 16 ? W : 0)));
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  auto mblock = [&](int64_t i0) {  // m[i0 .. i0 + 16), i0 % 16 == 0
    if (W >= 16) {
      const float* r = x + 2 * (i0 / W) * W + i0 % W;
      return nanmax16(_mm512_loadu_ps(r), _mm512_loadu_ps(r + W));
    }
    const float* r = x + 2 * i0;  // 16 / W pairs of rows: 32 inputs from row 2 i0 / W
    const __m512 a = _mm512_loadu_ps(r), b = _mm512_loadu_ps(r + 16);
    return nanmax16(_mm512_permutex2var_ps(a, itop, b), _mm512_permutex2var_ps(a, ibot, b));
  };
  at::parallel_for(0, blocks, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const __m512 m0 = mblock(32 * t), m1 = mblock(32 * t + 16);
      _mm512_storeu_ps(out + 16 * t,
                       nanmax16(_mm512_permutex2var_ps(m0, even, m1), _mm512_permutex2var_ps(m0, odd, m1)));
    }
  });
  for (int64_t k = 16 * blocks; k < M / 2; ++k) {  // the outputs past the last whole block
    const int64_t n = k / (W / 2), j = k % (W / 2);
    const float* r = x + 2 * n * W + 2 * j;
    out[k] = nanmax(nanmax(r[0], r[1]), nanmax(r[W], r[W + 1]));
  }
  return true;
}
#endif

at::Tensor max_pool2d_cpu(const at::Tensor& x_in, at::IntArrayRef kernel, at::IntArrayRef stride,
                          at::IntArrayRef padding) {
  TORCH_CHECK(x_in.device().is_cpu(), "max_pool2d: x must be a CPU tensor here, got ", x_in.device());
  if (x_in.scalar_type() != at::kFloat) return max_pool2d_aten(x_in, kernel, stride, padding);  // the same values
  const MaxPoolGeom g = max_pool2d_geometry(x_in, kernel, stride, padding);
  const int64_t kh = g.kh, kw = g.kw, sh = g.sh, sw = g.sw, ph = g.ph, pw = g.pw, Ho = g.Ho, Wo = g.Wo;
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({B, C, Ho, Wo}, x.options());
  if (out.numel() == 0) return out;
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
#if defined(__AVX512F__)
  if (kh == 2 && kw == 2 && sh == 2 && sw == 2 && ph == 0 && pw == 0 && pool_2x2_flat(src, dst, B * C, H, W))
    return out;
#endif
  const int64_t rows = B * C * Ho, plane_in = H * W;  // one task per output row
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(kh * W, 1));
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> vmax(static_cast<size_t>(W + 48));  // the column maxima of one output row's input rows
    for (int64_t n = lo; n < hi; ++n) {
      const int64_t plane = n / Ho, oh = n % Ho;
      const float* xp = src + plane * plane_in;
      const int64_t h0 = oh * sh - ph, a = std::max<int64_t>(h0, 0), b = std::min(h0 + kh, H);
      float* v = vmax.data();
      std::copy(xp + a * W, xp + (a + 1) * W, v);
      for (int64_t h = a + 1; h < b; ++h) {
        const float* r = xp + h * W;
        for (int64_t w = 0; w < W; ++w) v[w] = nanmax(v[w], r[w]);
      }
      row_maxima(v, W, Wo, kw, sw, pw, dst + n * Wo);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gencnp_fast, CPU, m) { m.impl("max_pool2d", &max_pool2d_cpu); }

}  // namespace gencnp_fast
