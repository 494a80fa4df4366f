// CPU kernel of gencnp_fast::gathered_conv2d (schema in csrc/ops.cpp).
//
// For every group g of samples that share (in_idx, out_idx) rows, the op is one GEMM
//
//   C_g[Mv x N_g] = A_g[Mv x K] * B_g[K x N_g],   K = (#valid inputs) * kh * kw,
//
// A_g: the weights of the group's active output rows x active input channels, gathered from the
// plain [C_out, C_in, kh, kw] weight (never materialised as a whole per-sample copy);
// B_g: the im2col of the compact input of every sample of the group; its N_g = (#samples) * Ho * Wo
// columns may span several samples, which keeps 2x2 / 1x1 maps and Linear layers (1 pixel)
// dense in the micro-kernel.
//
// Blocking:
//   * work item = (group, range of column blocks, range of 16-row tiles), scheduled dynamically
//     over at::parallel_for's threads (so 2 threads both work even at batch 1);
//   * B is never packed: a column is read in place through a per-column window pointer plus a
//     per-k offset table (koff), from x itself (padding 0) or from a zero-padded copy of the
//     valid channels of the block's samples (thread-local buffer, reused across calls);
//   * A: per 16-row tile, weights are gathered into a [K][16] panel (8x8 register transposes;
//     this gather, from L3, bounds per-sample masks on 4x4 maps); the panel is reused over
//     every column of the item, i.e. every pixel of every sample of the group, and cached for the
//     item when it has several column blocks;
//   * 16x12 (AVX-512) / 16x6 (AVX2+FMA) register-blocked FMA micro-kernel, output channels in the lanes
//     (portable GCC vector fallback); with AVX-512, 1x1 stride-1 convs on 128+ pixels and convs of horizontal
//     stride 1 on rows of a multiple of 16 pixels with K <= 576 put pixels in the lanes instead (pixel_tile:
//     vector stores in the epilogue where the channel tile scatters single floats);
//   * tiny maps (3x3 on 2x2: 8 <= input x output pixels <= 16, AVX-512): no GEMM at all, see run_tiny_map
//     (output channel outer, each (output, input) channel pair one vector FMA of its tap matrix);
//   * vector maps (13..16 output pixels: 4x4, AVX-512): a sample's pixels in the lanes, weights broadcast from their
//     rows in place (no packed tile), tiles of all groups in weight-row order, see run_vector_map;
//   * one-pixel layers at least 4096 weights wide (VGG-16's classifier; AVX-512): no GEMM either, see run_one_pixel
//     (chunks of output channels outer, a weight row read from memory once for every group that keeps it);
//   * fused epilogue: bias + residual + ReLU; rows with out_idx == -1 are written as exact zeros. With
//     residual_take the residual is read in place from its own channel set (no re-compacted copy).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../gathered_conv_params.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GENCNP_AVX2 1
#endif
#if defined(__AVX512F__)
#define GENCNP_AVX512 1
#endif

namespace gencnp_fast {

const char* cpu_kernel_isa() {
#if defined(GENCNP_AVX512)
  return "avx512f";
#elif defined(GENCNP_AVX2)
  return "avx2+fma";
#else
  return "generic-vector";
#endif
}

namespace {

constexpr int MR = 16;  // output channels per micro-tile (one AVX-512 / two AVX2 vectors)
#if defined(GENCNP_AVX512)
constexpr int NR = 12;  // output columns (pixels) per micro-tile: 12 zmm accumulators of 32
#else
constexpr int NR = 6;   // output columns (pixels) per micro-tile: 12 ymm accumulators of 16
#endif
constexpr int64_t kBBlockBytes = 192 * 1024;          // target size of the B source of a column block
constexpr int64_t kACacheFloats = 4 * 1024 * 1024;    // max packed weight tiles kept per item

// Thread-local, 64-byte aligned scratch that only grows (no allocation on the hot path).
struct ScratchBuffer {
  float* ptr = nullptr;
  size_t cap = 0;
  float* get(size_t n) {
    if (n > cap) {
      std::free(ptr);
      size_t bytes = ((std::max<size_t>(n, 16) * sizeof(float)) + 63) / 64 * 64;
      ptr = static_cast<float*>(std::aligned_alloc(64, bytes));
      TORCH_CHECK(ptr != nullptr, "gathered_conv2d: out of memory for scratch buffer");
      cap = bytes / sizeof(float);
    }
    return ptr;
  }
  ~ScratchBuffer() { std::free(ptr); }
};

struct IndexBuffer {
  std::vector<int64_t> v;
  int64_t* get(size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
  }
};

// fn(i) for every i in [0, n), on up to nthreads threads each taking the next i as it finishes one (dynamic load
// balance: items differ in size); on the calling thread alone with one thread or one item.
template <typename F>
void for_each_dynamic(int64_t n, int nthreads, const F& fn) {
  if (nthreads == 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(nthreads, n), 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  });
}

thread_local ScratchBuffer tl_a_buf;
thread_local IndexBuffer tl_koff;
thread_local ScratchBuffer tl_b_buf;

// ---------------------------------------------------------------------------------------
// Micro-kernel: Ct[n][r] = sum_k A[k][r] * B[k][n], r < 16, n < N (<= NR).
// A: [K][16] packed weights (64-byte aligned). B is never packed: column n of the im2col is
// read in place as bp[n][koff[k]] (bp[n] = the column's window origin in the zero-padded
// compact input, koff[k] = channel/tap offset), so there is no im2col buffer at all.
template <int N>
inline void micro_kernel(int64_t K, const float* __restrict A, const float* const* bp,
                         const int64_t* __restrict koff, float* __restrict Ct) {
  const float* p[N];
#pragma GCC unroll 12
  for (int n = 0; n < N; ++n) p[n] = bp[n];
#if defined(GENCNP_AVX512)
  // one zmm of A (16 rows) per k, times N broadcast columns (folded into the FMAs as {1to16} operands): 1 + N
  // loads per N FMAs, against 3 + N per 2N ymm FMAs in the AVX2 kernel
  __m512 c[N];
#pragma GCC unroll 12
  for (int n = 0; n < N; ++n) c[n] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    const int64_t off = koff[k];
    const __m512 a = _mm512_load_ps(A + k * MR);
#pragma GCC unroll 12
    for (int n = 0; n < N; ++n) c[n] = _mm512_fmadd_ps(a, _mm512_set1_ps(p[n][off]), c[n]);
  }
#pragma GCC unroll 12
  for (int n = 0; n < N; ++n) _mm512_storeu_ps(Ct + n * MR, c[n]);
#elif defined(GENCNP_AVX2)
  __m256 c0[N], c1[N];
#pragma GCC unroll 6
  for (int n = 0; n < N; ++n) {
    c0[n] = _mm256_setzero_ps();
    c1[n] = _mm256_setzero_ps();
  }
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    const int64_t off = koff[k];
    const __m256 a0 = _mm256_load_ps(A + k * MR);
    const __m256 a1 = _mm256_load_ps(A + k * MR + 8);
#pragma GCC unroll 6
    for (int n = 0; n < N; ++n) {
      const __m256 b = _mm256_broadcast_ss(p[n] + off);
      c0[n] = _mm256_fmadd_ps(a0, b, c0[n]);
      c1[n] = _mm256_fmadd_ps(a1, b, c1[n]);
    }
  }
#pragma GCC unroll 6
  for (int n = 0; n < N; ++n) {
    _mm256_storeu_ps(Ct + n * MR, c0[n]);
    _mm256_storeu_ps(Ct + n * MR + 8, c1[n]);
  }
#else
  typedef float v8 __attribute__((vector_size(32), aligned(32)));
  typedef float v8u __attribute__((vector_size(32), aligned(4)));
  v8 c0[N], c1[N];
  for (int n = 0; n < N; ++n) {
    c0[n] = v8{};
    c1[n] = v8{};
  }
  for (int64_t k = 0; k < K; ++k) {
    const int64_t off = koff[k];
    const v8 a0 = *reinterpret_cast<const v8*>(A + k * MR);
    const v8 a1 = *reinterpret_cast<const v8*>(A + k * MR + 8);
    for (int n = 0; n < N; ++n) {
      const float bs = p[n][off];
      const v8 b = {bs, bs, bs, bs, bs, bs, bs, bs};
      c0[n] += a0 * b;
      c1[n] += a1 * b;
    }
  }
  for (int n = 0; n < N; ++n) {
    *reinterpret_cast<v8u*>(Ct + n * MR) = c0[n];
    *reinterpret_cast<v8u*>(Ct + n * MR + 8) = c1[n];
  }
#endif
}

inline void run_micro_kernel(int nr, int64_t K, const float* A, const float* const* bp, const int64_t* koff,
                             float* Ct) {
  switch (nr) {
#if defined(GENCNP_AVX512)
    case 12: micro_kernel<12>(K, A, bp, koff, Ct); break;
    case 11: micro_kernel<11>(K, A, bp, koff, Ct); break;
    case 10: micro_kernel<10>(K, A, bp, koff, Ct); break;
    case 9: micro_kernel<9>(K, A, bp, koff, Ct); break;
    case 8: micro_kernel<8>(K, A, bp, koff, Ct); break;
    case 7: micro_kernel<7>(K, A, bp, koff, Ct); break;
#endif
    case 6: micro_kernel<6>(K, A, bp, koff, Ct); break;
    case 5: micro_kernel<5>(K, A, bp, koff, Ct); break;
    case 4: micro_kernel<4>(K, A, bp, koff, Ct); break;
    case 3: micro_kernel<3>(K, A, bp, koff, Ct); break;
    case 2: micro_kernel<2>(K, A, bp, koff, Ct); break;
    default: micro_kernel<1>(K, A, bp, koff, Ct); break;
  }
}

// ---------------------------------------------------------------------------------------
struct ConvGeom {
  int64_t Kin, H, W, HW, Ho, Wo, P, kh, kw, khw, sh, sw, ph, pw, dh, dw;
  int64_t Cin, Kout, Cout;
  int64_t Hp, Wp, plane;  // geometry of the B source: padded copy (padding > 0) or x itself
  bool padded;            // padding > 0: B is read from a zero-padded copy of the valid channels
};

struct GroupInfo {
  int64_t start = 0;   // first entry in `samples` (sorted by group id)
  int64_t count = 0;   // number of samples
  int64_t in_off = 0;  // offset into in_pos / in_ch
  int64_t kv = 0;      // number of valid input entries
  int64_t out_off = 0; // offset into out_pos / out_ch
  int64_t mv = 0;      // number of valid output entries
  int64_t nc = 0;      // columns per block
};

struct WorkItem {
  int64_t g;
  int64_t c0, c1;  // column range (multiple of nc except c1 == N_g)
  int64_t m0, m1;  // 16-row tile range
};

struct Problem {
  ConvGeom geo;
  const float* x;
  const float* w;
  const float* bias;      // may be null
  const float* residual;  // may be null
  const int64_t* res_take;  // residual channel of each output position (-1: none), or null: the position itself
  int64_t take_stride = 0;  // between the res_take rows of consecutive samples: 0 (one row) or Kout (a row each)
  int64_t res_K = 0;        // channels of the residual per sample (Kres with res_take, else Kout)
  float* out;
  bool relu;
  std::vector<int64_t> samples;  // sample ids ordered by group
  std::vector<GroupInfo> groups;
  std::vector<int64_t> in_pos, in_ch, out_pos, out_ch;

  // The residual channel that output position `pos` of sample b adds (-1: none).
  int64_t residual_channel(int64_t b, int64_t pos) const {
    return res_take ? res_take[b * take_stride + pos] : pos;
  }
  // The residual plane that output position `pos` of sample b adds (P floats), or null: none.
  const float* residual_at(int64_t b, int64_t pos) const {
    const int64_t rc = residual != nullptr ? residual_channel(b, pos) : -1;
    return rc >= 0 ? residual + (b * res_K + rc) * geo.P : nullptr;
  }
  // The sample of an output offset (sample * Kout * P + pixel).
  int64_t sample_of(int64_t out_offset) const { return out_offset / (geo.Kout * geo.P); }
};

// Gather weights of tile `mt` of group g into dst [K][16] (rows past mv are zero).
#if defined(GENCNP_AVX2)
// d[u * MR + q] = s[q][u] for q, u < 8 (8 rows x 8 taps -> tap-major, one 8x8 transpose).
inline void transpose8x8_store(const float* const* s, int64_t off, float* __restrict d) {
  const __m256 r0 = _mm256_loadu_ps(s[0] + off), r1 = _mm256_loadu_ps(s[1] + off);
  const __m256 r2 = _mm256_loadu_ps(s[2] + off), r3 = _mm256_loadu_ps(s[3] + off);
  const __m256 r4 = _mm256_loadu_ps(s[4] + off), r5 = _mm256_loadu_ps(s[5] + off);
  const __m256 r6 = _mm256_loadu_ps(s[6] + off), r7 = _mm256_loadu_ps(s[7] + off);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  _mm256_store_ps(d + 0 * MR, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_store_ps(d + 1 * MR, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_store_ps(d + 2 * MR, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_store_ps(d + 3 * MR, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_store_ps(d + 4 * MR, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_store_ps(d + 5 * MR, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_store_ps(d + 6 * MR, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_store_ps(d + 7 * MR, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#endif

// Gather the weights of tile `mt` of group g into dst [K][16]: row r of the tile is output
// channel out_ch[16 mt + r], k = jv * khw + t reads weight[o, in_ch[jv], t]. Rows past mv
// repeat row 0 (finite values; the epilogue never stores them).
template <int KHW>
void pack_weight_tile_impl(const Problem& pb, const GroupInfo& gi, int64_t mt, float* __restrict dst,
                           int64_t khw_rt) {
  const int64_t khw = KHW > 0 ? KHW : khw_rt;
  const int64_t row_stride = pb.geo.Cin * khw;
  const float* rows[MR];
  const int64_t r0 = mt * MR;
  for (int r = 0; r < MR; ++r) {
    const int64_t rr = (r0 + r < gi.mv) ? r0 + r : r0;
    rows[r] = pb.w + pb.out_ch[gi.out_off + rr] * row_stride;
  }
  const int64_t* ich = pb.in_ch.data() + gi.in_off;
  for (int64_t jv = 0; jv < gi.kv; ++jv) {
    const int64_t off = ich[jv] * khw;
    float* d = dst + jv * khw * MR;
#if defined(GENCNP_AVX2)
    int64_t t = 0;
    for (; t + 8 <= khw; t += 8) {
      transpose8x8_store(rows, off + t, d + t * MR);
      transpose8x8_store(rows + 8, off + t, d + t * MR + 8);
    }
    for (; t < khw; ++t) {
      const int64_t o = off + t;
      _mm256_store_ps(d + t * MR, _mm256_setr_ps(rows[0][o], rows[1][o], rows[2][o], rows[3][o], rows[4][o],
                                                 rows[5][o], rows[6][o], rows[7][o]));
      _mm256_store_ps(d + t * MR + 8, _mm256_setr_ps(rows[8][o], rows[9][o], rows[10][o], rows[11][o],
                                                     rows[12][o], rows[13][o], rows[14][o], rows[15][o]));
    }
#else
    for (int r = 0; r < MR; ++r) {
      const float* s = rows[r] + off;
      for (int64_t t = 0; t < khw; ++t) d[t * MR + r] = s[t];
    }
#endif
  }
}

void pack_weight_tile(const Problem& pb, const GroupInfo& gi, int64_t mt, float* dst) {
  switch (pb.geo.khw) {
    case 1: pack_weight_tile_impl<1>(pb, gi, mt, dst, 1); break;
    case 9: pack_weight_tile_impl<9>(pb, gi, mt, dst, 9); break;
    default: pack_weight_tile_impl<0>(pb, gi, mt, dst, pb.geo.khw); break;
  }
}

// Zero-padded copy of a band of rows of the valid input channels of one sample of group g: padded rows
// [y0, y1) (padded coordinates: row y holds input row y - ph) of every valid channel, into dst[jv][y - y0][Wp]
// with a channel stride of `plane`. Only used when padding > 0 (otherwise B is read from x in place). A column
// block copies only the rows its output rows read: a 224 x 224 map is not copied whole for every block.
void pad_band(const Problem& pb, const GroupInfo& gi, int64_t s, int64_t y0, int64_t y1, int64_t plane,
              float* __restrict dst) {
  const ConvGeom& G = pb.geo;
  const int64_t* ipos = pb.in_pos.data() + gi.in_off;
  const float* xb = pb.x + pb.samples[gi.start + s] * G.Kin * G.HW;
  for (int64_t jv = 0; jv < gi.kv; ++jv) {
    const float* src = xb + ipos[jv] * G.HW;
    float* d = dst + jv * plane;
    for (int64_t y = y0; y < y1; ++y, d += G.Wp) {
      const int64_t iy = y - G.ph;
#if defined(GENCNP_AVX512)
      // 16 columns at a time, masked (no library call per row: the rows of 7x7 / 14x14 maps are a few floats, and
      // a call per row cost a quarter of a 7x7 layer's time); lanes outside the input row are zeros
      const bool inside = iy >= 0 && iy < G.H;
      const float* row = src + (inside ? iy : 0) * G.W;  // not read outside the input rows (mask 0)
      for (int64_t c0 = 0; c0 < G.Wp; c0 += 16) {
        const int64_t n = std::min<int64_t>(16, G.Wp - c0);
        const int64_t lo = std::clamp<int64_t>(G.pw - c0, 0, n), hi = std::clamp<int64_t>(G.pw + G.W - c0, 0, n);
        const __mmask16 in = inside ? static_cast<__mmask16>(((1u << hi) - 1u) & ~((1u << lo) - 1u)) : 0;
        const __m512 v = _mm512_maskz_loadu_ps(in, row + (c0 - G.pw));
        _mm512_mask_storeu_ps(d + c0, static_cast<__mmask16>((1u << n) - 1u), v);
      }
#else
      if (iy < 0 || iy >= G.H) {
        std::memset(d, 0, sizeof(float) * G.Wp);
        continue;
      }
      for (int64_t t = 0; t < G.pw; ++t) d[t] = 0.f;
      std::memcpy(d + G.pw, src + iy * G.W, sizeof(float) * G.W);
      for (int64_t t = G.pw + G.W; t < G.Wp; ++t) d[t] = 0.f;
#endif
    }
  }
}

// The padded rows [y0, y1) that the output pixels [p0, p1) of one sample read.
inline void band_rows(const ConvGeom& G, int64_t p0, int64_t p1, int64_t& y0, int64_t& y1) {
  y0 = (p0 / G.Wo) * G.sh;
  y1 = ((p1 - 1) / G.Wo) * G.sh + (G.kh - 1) * G.dh + 1;
}

// bias + residual + ReLU, scatter the 16 x nr tile into out. cbase[n]: offset of column n in
// out (sample * Kout * P + pixel); roff[r]: offset of tile row r (out position * P). The residual of (r, n) is at
// rbase[n] + rroff[r] (the same offsets as out unless residual_take re-maps the rows), none where rroff[r] < 0.
template <bool RES, bool RELU>
inline void epilogue_impl(float* __restrict out, const float* __restrict res, const int64_t* cbase,
                          const int64_t* rbase, int nr, int rows, const int64_t* roff, const int64_t* rroff,
                          const float* bvals, const float* __restrict Ct) {
  bool contiguous = true;
  for (int n = 1; n < nr; ++n) contiguous &= (cbase[n] == cbase[0] + n);
  if (contiguous) {  // one sample, consecutive pixels: its residual columns are consecutive too
    for (int r = 0; r < rows; ++r) {
      const int64_t o = cbase[0] + roff[r];
      const bool add = RES && rroff[r] >= 0;
      const float* rr = add ? res + rbase[0] + rroff[r] : nullptr;
      const float bv = bvals[r];
      for (int n = 0; n < nr; ++n) {
        float v = Ct[n * MR + r] + bv;
        if (add) v += rr[n];
        if (RELU) v = v < 0.f ? 0.f : v;  // NaN stays NaN, as torch.relu
        out[o + n] = v;
      }
    }
  } else {
    for (int r = 0; r < rows; ++r) {
      const bool add = RES && rroff[r] >= 0;
      const float bv = bvals[r];
      for (int n = 0; n < nr; ++n) {
        const int64_t o = cbase[n] + roff[r];
        float v = Ct[n * MR + r] + bv;
        if (add) v += res[rbase[n] + rroff[r]];
        if (RELU) v = v < 0.f ? 0.f : v;  // NaN stays NaN, as torch.relu
        out[o] = v;
      }
    }
  }
}

using EpilogueFn = void (*)(float*, const float*, const int64_t*, const int64_t*, int, int, const int64_t*,
                            const int64_t*, const float*, const float*);

EpilogueFn pick_epilogue(bool res, bool relu) {
  if (res) return relu ? &epilogue_impl<true, true> : &epilogue_impl<true, false>;
  return relu ? &epilogue_impl<false, true> : &epilogue_impl<false, false>;
}

struct ColumnBuffer {
  std::vector<const float*> ptr;
  std::vector<int64_t> base;
  std::vector<int64_t> rbase;  // with residual_take: residual offset of each column (sample * res_K * P + pixel)
  std::vector<int64_t> left;   // pixel tiles: output pixels from the column to the end of its row
};
thread_local ColumnBuffer tl_cols;

#if defined(GENCNP_AVX512)
// Pixel-vectorised tiles: pixels in the vector lanes instead of output channels. Per 16-row weight tile and up to
// 16 output pixels whose windows lie at consecutive addresses of the B source (consecutive pixels of one sample
// for a 1x1 stride-1 conv; of one output row for any kernel with horizontal stride 1), acc[r] (the pixels of
// output channel r) += A[k][r] * src[koff[k] .. + 15]: one vector load of B per k. The epilogue then adds bias
// and residual and applies the ReLU on whole vectors and stores them contiguously, where the channel-vectorised
// kernel scatters one float at a time: at small reductions (K up to a few hundred) that scatter costs as much as
// the FMAs. Sums run over k in the same order as in micro_kernel, so both kernels give the same bits.
inline void pixel_tile(int64_t K, const float* __restrict A, const float* src, const int64_t* __restrict koff,
                       __mmask16 lanes, float* __restrict Ct) {
  __m512 acc[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 bv = _mm512_maskz_loadu_ps(lanes, src + koff[k]);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(A[k * MR + r]), bv, acc[r]);
  }
  // through memory with constant indices only: indexing acc by the runtime row count of the epilogue would keep
  // the whole array on the stack, stored after every FMA of the loop above
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) _mm512_store_ps(Ct + r * 16, acc[r]);
}

// bias + residual + ReLU of a pixel tile, row r stored at out + obase + opos[r] * P; its residual, if any, at
// residual + rbase + (residual channel) * P.
inline void pixel_epilogue(const Problem& pb, int rows, const int64_t* opos, const int64_t* och, int64_t b,
                           int64_t obase, int64_t rbase, __mmask16 lanes, const float* Ct) {
  const int64_t P = pb.geo.P;
  const __m512 zero = _mm512_setzero_ps();
  for (int r = 0; r < rows; ++r) {
    __m512 v = _mm512_add_ps(_mm512_load_ps(Ct + r * 16), _mm512_set1_ps(pb.bias ? pb.bias[och[r]] : 0.f));
    const int64_t rc = pb.residual_channel(b, opos[r]);
    if (pb.residual != nullptr && rc >= 0)
      v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(lanes, pb.residual + rbase + rc * P));
    if (pb.relu) v = _mm512_max_ps(zero, v);  // NaN stays NaN (max returns its second operand for a NaN)
    _mm512_mask_storeu_ps(pb.out + obase + opos[r] * P, lanes, v);
  }
}

// Pointwise layers (1x1 kernel, stride 1, no padding: ResNet's bottleneck convs) read B from x in place, 16
// consecutive pixels of one sample per tile (a tile may span rows). Taken where it wins (paired A/B on the 2-core
// Zen 4 VM, 1 and 2 threads): 1.3-1.8x on ResNet-50's 56x56 and 28x28 bottleneck convs (K = 16..64), 1.07-1.12x at
// 14x14 with K = 64; 0.87-0.9x at K = 256 or 7x7 maps (a 16-pixel tile of a 49-pixel map wastes a quarter of its
// lanes), which keep the channel-vectorised kernel.
bool pointwise(const ConvGeom& G, int64_t kv) {
  return G.khw == 1 && G.sh == 1 && G.sw == 1 && !G.padded && G.dh == 1 && G.dw == 1 && kv <= 128 && G.P >= 128;
}

// Other convs with horizontal stride 1 whose output rows are whole 16-pixel tiles and with a reduction of at most
// kPixelMaxK: pixel tiles along each output row, B read through the block's padded band copy like the
// channel-vectorised kernel. Paired A/B of the op (shared mask, widths 16 and 32; median of 9 after a warm-up,
// twice, 2 threads, Zen 4 VM): 1.13x at K = 144, 1.06x at K = 288, 1.03x at K = 576, 1.0x at K = 1152; VGG-16's
// first layer at 224x224 (K = 27) 1.4x. Rows of 14, 28 or 56 pixels leave a tile partly empty and lost (0.92-1.02x
// at K = 144..576), 7x7 and 8x8 maps lost 0.5-0.67x: they keep the channel-vectorised kernel.
constexpr int64_t kPixelMaxK = 576;
bool pixel_rows(const ConvGeom& G, int64_t K) { return G.sw == 1 && G.Wo % 16 == 0 && K <= kPixelMaxK; }

__attribute__((noinline)) void run_item_pointwise(const Problem& pb, const WorkItem& it) {
  const ConvGeom& G = pb.geo;
  const GroupInfo& gi = pb.groups[it.g];
  const int64_t K = gi.kv, P = G.P;
  const int64_t tile_floats = K * MR, ntiles = it.m1 - it.m0;
  float* abuf = tl_a_buf.get(static_cast<size_t>(std::max<int64_t>(ntiles * tile_floats, 16)));
  for (int64_t mt = it.m0; mt < it.m1; ++mt) pack_weight_tile(pb, gi, mt, abuf + (mt - it.m0) * tile_floats);
  int64_t* koff = tl_koff.get(static_cast<size_t>(std::max<int64_t>(K, 1)));
  const int64_t* ipos = pb.in_pos.data() + gi.in_off;
  for (int64_t k = 0; k < K; ++k) koff[k] = ipos[k] * P;
  alignas(64) float Ct[MR * 16];
  // Column blocks whose B rows (K x block x 4 bytes) stay in L2 while every weight tile (K x 16, in L1) streams
  // over them.
  const int64_t block = std::max<int64_t>(16, (kBBlockBytes / (4 * std::max<int64_t>(K, 1))) / 16 * 16);
  for (int64_t cb = it.c0; cb < it.c1; cb += block) {
    const int64_t ce = std::min(cb + block, it.c1);
    for (int64_t mt = it.m0; mt < it.m1; ++mt) {
      const float* A = abuf + (mt - it.m0) * tile_floats;
      const int rows = static_cast<int>(std::min<int64_t>(MR, gi.mv - mt * MR));
      const int64_t* opos = pb.out_pos.data() + gi.out_off + mt * MR;
      const int64_t* och = pb.out_ch.data() + gi.out_off + mt * MR;
      for (int64_t c = cb; c < ce;) {  // column c of the group: sample c / P, pixel c % P
        const int64_t s = c / P, p = c - s * P;
        const int n = static_cast<int>(std::min<int64_t>({16, P - p, ce - c}));
        const __mmask16 lanes = static_cast<__mmask16>((1u << n) - 1u);
        const int64_t b = pb.samples[gi.start + s];
        pixel_tile(K, A, pb.x + b * G.Kin * P + p, koff, lanes, Ct);
        pixel_epilogue(pb, rows, opos, och, b, b * G.Kout * P + p, b * pb.res_K * P + p, lanes, Ct);
        c += n;
      }
    }
  }
}
#endif

#if defined(GENCNP_AVX512)
// The columns [0, ncol) of a block (windows and offsets in `cols`) as pixel tiles along their output rows. Both
// pixel paths stay out of line: inlined into run_item (run_item_pointwise was), they changed how GCC compiled its
// channel-vectorised loop once this path existed (K = 1152 layers, which never take a pixel path, ran 10-20 %
// slower in paired runs; out of line, as fast as before).
__attribute__((noinline)) void run_pixel_row_tiles(const Problem& pb, const ColumnBuffer& cols, int64_t ncol,
                                                   int64_t K, const float* A, const int64_t* koff, int rows,
                                                   const int64_t* opos, const int64_t* och) {
  alignas(64) float Ct[MR * 16];
  for (int64_t i = 0; i < ncol;) {
    const int n = static_cast<int>(std::min<int64_t>({16, cols.left[i], ncol - i}));
    const __mmask16 lanes = static_cast<__mmask16>((1u << n) - 1u);
    pixel_tile(K, A, cols.ptr[i], koff, lanes, Ct);
    const int64_t b = pb.take_stride ? pb.sample_of(cols.base[i]) : 0;  // only a per-sample take reads it
    pixel_epilogue(pb, rows, opos, och, b, cols.base[i], pb.res_take ? cols.rbase[i] : cols.base[i], lanes, Ct);
    i += n;
  }
}
#endif

void run_item(const Problem& pb, const WorkItem& it) {
  const ConvGeom& G = pb.geo;
#if defined(GENCNP_AVX512)
  if (pointwise(G, pb.groups[it.g].kv)) return run_item_pointwise(pb, it);
#endif
  const GroupInfo& gi = pb.groups[it.g];
  const int64_t K = gi.kv * G.khw;
#if defined(GENCNP_AVX512)
  const bool pix = pixel_rows(G, K);
#else
  constexpr bool pix = false;
#endif
  const int64_t tile_floats = K * MR;
  const int64_t ntiles = it.m1 - it.m0;
  const int64_t nblocks = (it.c1 - it.c0 + gi.nc - 1) / gi.nc;
  const bool cache_a = nblocks > 1 && ntiles * tile_floats <= kACacheFloats;
  float* abuf = tl_a_buf.get(static_cast<size_t>(cache_a ? ntiles * tile_floats : tile_floats));
  if (cache_a) {
    for (int64_t mt = it.m0; mt < it.m1; ++mt)
      pack_weight_tile(pb, gi, mt, abuf + (mt - it.m0) * tile_floats);
  }
  // Offsets of the K im2col rows relative to a column's window origin: channel jv at jv * plane in a block's
  // padded band copy, or at its position in x (no padding).
  int64_t* koff = tl_koff.get(static_cast<size_t>(std::max<int64_t>(K, 1)));
  const int64_t* ipos = pb.in_pos.data() + gi.in_off;
  const int64_t rowlen = G.padded ? G.Wp : G.W;
  auto set_koff = [&](int64_t plane) {
    for (int64_t jv = 0; jv < gi.kv; ++jv) {
      const int64_t cbase = (G.padded ? jv * plane : ipos[jv] * G.HW);
      for (int64_t ky = 0; ky < G.kh; ++ky)
        for (int64_t kx = 0; kx < G.kw; ++kx)
          koff[(jv * G.kh + ky) * G.kw + kx] = cbase + ky * G.dh * rowlen + kx * G.dw;
    }
  };
  if (!G.padded) set_koff(G.HW);
  const EpilogueFn epi = pick_epilogue(pb.residual != nullptr, pb.relu);
  alignas(64) float Ct[MR * NR];
  int64_t roff[MR], rroff[MR];
  float bvals[MR];
  ColumnBuffer& cols = tl_cols;
  int64_t band_y0[2] = {0, 0};  // first padded row of the band copy of the block's first / other samples
  for (int64_t cb = it.c0; cb < it.c1; cb += gi.nc) {
    const int64_t ce = std::min(cb + gi.nc, it.c1);
    const int64_t npanel = (ce - cb + NR - 1) / NR;
    const int64_t s0 = cb / G.P, s1 = (ce - 1) / G.P + 1;
    const float* src = nullptr;
    int64_t sstride = G.Kin * G.HW;  // between samples in the B source
    if (G.padded) {
      // one band per sample: the rows its output pixels of this block read (whole maps for samples inside)
      int64_t y0 = 0, y1 = 0, hb = 0;
      for (int64_t s = s0; s < s1; ++s) {
        band_rows(G, s == s0 ? cb - s0 * G.P : 0, s == s1 - 1 ? ce - s * G.P : G.P, y0, y1);
        hb = std::max(hb, y1 - y0);
      }
      const int64_t plane = hb * G.Wp;
      sstride = gi.kv * plane;
      float* pbuf = tl_b_buf.get(static_cast<size_t>((s1 - s0) * sstride + 16));
      for (int64_t s = s0; s < s1; ++s) {
        band_rows(G, s == s0 ? cb - s0 * G.P : 0, s == s1 - 1 ? ce - s * G.P : G.P, y0, y1);
        pad_band(pb, gi, s, y0, y1, plane, pbuf + (s - s0) * sstride);
        band_y0[s == s0 ? 0 : 1] = y0;
      }
      set_koff(plane);
      src = pbuf;
    }
    // Per column: window origin in the B source and offset in out.
    const int64_t ncol = npanel * NR;
    if (static_cast<int64_t>(cols.ptr.size()) < ncol) {
      cols.ptr.resize(ncol);
      cols.base.resize(ncol);
    }
    // sized on its own: the thread's buffers outlive the call, and calls without residual_take leave rbase short
    if (pb.res_take && static_cast<int64_t>(cols.rbase.size()) < ncol) cols.rbase.resize(ncol);
    if (pix && static_cast<int64_t>(cols.left.size()) < ncol) cols.left.resize(ncol);
    {
      // walk (sample, oy, ox) incrementally: no divisions per column
      int64_t s = s0, p = cb - s0 * G.P;
      int64_t oy = p / G.Wo, ox = p - oy * G.Wo;
      for (int64_t i = 0; i < ce - cb; ++i) {
        const int64_t b = pb.samples[gi.start + s];
        const float* sb = G.padded ? src + (s - s0) * sstride - band_y0[s == s0 ? 0 : 1] * rowlen
                                   : pb.x + b * sstride;
        cols.ptr[i] = sb + oy * G.sh * rowlen + ox * G.sw;
        cols.base[i] = b * G.Kout * G.P + p;
        if (pb.res_take) cols.rbase[i] = b * pb.res_K * G.P + p;
        if (pix) cols.left[i] = G.Wo - ox;
        ++p;
        if (++ox == G.Wo) {
          ox = 0;
          if (++oy == G.Ho) {
            oy = 0;
            p = 0;
            ++s;
          }
        }
      }
      for (int64_t i = ce - cb; i < ncol; ++i) {  // pad the last panel with its last column
        cols.ptr[i] = cols.ptr[ce - cb - 1];
        cols.base[i] = cols.base[ce - cb - 1];
        if (pb.res_take) cols.rbase[i] = cols.rbase[ce - cb - 1];
      }
    }
    for (int64_t mt = it.m0; mt < it.m1; ++mt) {
      const float* A;
      if (cache_a) {
        A = abuf + (mt - it.m0) * tile_floats;
      } else {
        pack_weight_tile(pb, gi, mt, abuf);
        A = abuf;
      }
      const int rows = static_cast<int>(std::min<int64_t>(MR, gi.mv - mt * MR));
      const int64_t* opos = pb.out_pos.data() + gi.out_off + mt * MR;
      const int64_t* och = pb.out_ch.data() + gi.out_off + mt * MR;
#if defined(GENCNP_AVX512)
      if (pix) {  // its epilogue reads bias and residual channel per row itself
        run_pixel_row_tiles(pb, cols, ce - cb, K, A, koff, rows, opos, och);
        continue;
      }
#endif
      // the residual row offsets of sample b (any b when they do not depend on the sample)
      auto set_rroff = [&](int64_t b) {
        for (int r = 0; r < rows; ++r) {
          const int64_t rc = pb.residual_channel(b, opos[r]);
          rroff[r] = rc >= 0 ? rc * G.P : -1;
        }
      };
      for (int r = 0; r < rows; ++r) {
        roff[r] = opos[r] * G.P;
        bvals[r] = pb.bias ? pb.bias[och[r]] : 0.f;
      }
      set_rroff(0);
      int64_t rroff_b = 0;
      for (int64_t q = 0; q < npanel; ++q) {
        const int64_t c = cb + q * NR;
        const int nr = static_cast<int>(std::min<int64_t>(NR, ce - c));
        run_micro_kernel(nr, K, A, cols.ptr.data() + q * NR, koff, Ct);
        // without residual_take the residual sits at out's offsets (res_K == Kout)
        const int64_t* rbase = (pb.res_take ? cols.rbase.data() : cols.base.data()) + q * NR;
        const int64_t* obase = cols.base.data() + q * NR;
        if (!pb.take_stride || pb.residual == nullptr) {
          epi(pb.out, pb.residual, obase, rbase, nr, rows, roff, rroff, bvals, Ct);
          continue;
        }
        // a residual_take row per sample: the tile's columns in runs of one sample each
        for (int n0 = 0; n0 < nr;) {
          const int64_t b = pb.sample_of(obase[n0]);
          int n1 = n0 + 1;
          while (n1 < nr && pb.sample_of(obase[n1]) == b) ++n1;
          if (b != rroff_b) set_rroff(rroff_b = b);
          epi(pb.out, pb.residual, obase + n0, rbase + n0, n1 - n0, rows, roff, rroff, bvals, Ct + n0 * MR);
          n0 = n1;
        }
      }
    }
  }
}

// The problem description of a call: geometry, pointers, and per group its samples and valid entries (read from
// the problem list the params carry). Samples of one group must have identical in_idx / out_idx rows.
Problem describe(const GatheredConvParams& p, at::Tensor& out) {
  Problem pb;
  ConvGeom& G = pb.geo;
  G.Kin = p.Kin; G.H = p.H; G.W = p.W; G.HW = p.H * p.W; G.Ho = p.Ho; G.Wo = p.Wo; G.P = p.Ho * p.Wo;
  G.kh = p.kh; G.kw = p.kw; G.khw = p.kh * p.kw; G.sh = p.sh; G.sw = p.sw; G.ph = p.ph; G.pw = p.pw;
  G.dh = p.dh; G.dw = p.dw; G.Cin = p.Cin; G.Kout = p.Kout; G.Cout = p.Cout;
  G.padded = p.ph > 0 || p.pw > 0;
  G.Hp = p.H + 2 * p.ph;
  G.Wp = p.W + 2 * p.pw;
  G.plane = G.padded ? G.Hp * G.Wp : G.HW;
  pb.x = p.x.data_ptr<float>();
  pb.w = p.weight.data_ptr<float>();
  pb.bias = p.bias.defined() ? p.bias.data_ptr<float>() : nullptr;
  pb.residual = p.residual.defined() ? p.residual.data_ptr<float>() : nullptr;
  pb.res_take = p.residual_take.defined() ? p.residual_take.data_ptr<int64_t>() : nullptr;
  pb.take_stride = p.residual_take.defined() && p.residual_take.dim() == 2 ? p.Kout : 0;
  pb.res_K = p.residual.defined() ? p.residual.size(1) : p.Kout;
  pb.out = out.data_ptr<float>();
  pb.relu = p.relu;

  const int64_t B = p.B, Kin = p.Kin, Kout = p.Kout;
  const int32_t* ii = p.in_idx.data_ptr<int32_t>();
  const int32_t* oi = p.out_idx.data_ptr<int32_t>();
  const int32_t* q = p.problems.data_ptr<int32_t>();  // samples by group, starts, sizes (checked)
  pb.samples.assign(q, q + B);
  for (int64_t g = 0; g < p.ngroups; ++g) {
    GroupInfo gi;
    gi.start = q[B + g];
    gi.count = q[B + p.ngroups + g];
    const int64_t rep = pb.samples[gi.start];
    for (int64_t s = gi.start + 1; s < gi.start + gi.count; ++s) {
      const int64_t b = pb.samples[s];
      TORCH_CHECK(std::memcmp(ii + b * Kin, ii + rep * Kin, sizeof(int32_t) * Kin) == 0 &&
                      std::memcmp(oi + b * Kout, oi + rep * Kout, sizeof(int32_t) * Kout) == 0,
                  "gathered_conv2d: samples ", rep, " and ", b, " are in one group (sample_group ",
                  p.sample_group.data_ptr<int32_t>()[b], ") but have different in_idx/out_idx rows");
    }
    gi.in_off = static_cast<int64_t>(pb.in_pos.size());
    for (int64_t j = 0; j < Kin; ++j) {
      if (ii[rep * Kin + j] >= 0) {
        pb.in_pos.push_back(j);
        pb.in_ch.push_back(ii[rep * Kin + j]);
      }
    }
    gi.kv = static_cast<int64_t>(pb.in_pos.size()) - gi.in_off;
    gi.out_off = static_cast<int64_t>(pb.out_pos.size());
    for (int64_t j = 0; j < Kout; ++j) {
      if (oi[rep * Kout + j] >= 0) {
        pb.out_pos.push_back(j);
        pb.out_ch.push_back(oi[rep * Kout + j]);
      }
    }
    gi.mv = static_cast<int64_t>(pb.out_pos.size()) - gi.out_off;
    pb.groups.push_back(gi);
  }
  // Rows with out_idx == -1 are exact zeros.
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < Kout; ++j) {
      if (oi[b * Kout + j] < 0) std::memset(pb.out + (b * Kout + j) * G.P, 0, sizeof(float) * G.P);
    }
  }
  return pb;
}

#if defined(GENCNP_AVX512)
// (group, entry r) of every kept output position, by chunks of `chunk` output channels (channels [c * chunk,
// (c + 1) * chunk) own entries[start[c] .. start[c + 1])), by group within a chunk.
struct ChunkEntries {
  std::vector<int64_t> start;
  std::vector<std::pair<int64_t, int64_t>> entries;
};

ChunkEntries entries_by_chunk(const Problem& pb, int64_t chunk) {
  const int64_t ng = static_cast<int64_t>(pb.groups.size());
  const int64_t nchunks = (pb.geo.Cout + chunk - 1) / chunk;
  ChunkEntries ce;
  ce.start.assign(nchunks + 1, 0);
  for (int64_t g = 0; g < ng; ++g) {
    const GroupInfo& gi = pb.groups[g];
    for (int64_t r = 0; r < gi.mv; ++r) ++ce.start[pb.out_ch[gi.out_off + r] / chunk + 1];
  }
  for (int64_t c = 0; c < nchunks; ++c) ce.start[c + 1] += ce.start[c];
  ce.entries.resize(ce.start[nchunks]);
  std::vector<int64_t> fill(ce.start.begin(), ce.start.end() - 1);
  for (int64_t g = 0; g < ng; ++g) {
    const GroupInfo& gi = pb.groups[g];
    for (int64_t r = 0; r < gi.mv; ++r) ce.entries[fill[pb.out_ch[gi.out_off + r] / chunk]++] = {g, r};
  }
  return ce;
}

// Byte offsets of the 64-byte lines of a weight row (its Cin x khw floats) that some group reads: the lines a path
// that walks the rows in order prefetches for the next ones.
std::vector<int64_t> row_lines(const Problem& pb) {
  const ConvGeom& G = pb.geo;
  std::vector<char> hit((G.Cin * G.khw * 4 + 63) / 64, 0);
  for (const GroupInfo& gi : pb.groups) {
    for (int64_t jv = 0; jv < gi.kv; ++jv) {
      const int64_t c = pb.in_ch[gi.in_off + jv];
      for (int64_t l = c * G.khw * 4 / 64; l <= ((c + 1) * G.khw * 4 - 1) / 64; ++l) hit[l] = 1;
    }
  }
  std::vector<int64_t> lines;
  for (int64_t l = 0; l < static_cast<int64_t>(hit.size()); ++l)
    if (hit[l]) lines.push_back(l * 64);
  return lines;
}

// Tiny maps (an input of Pi pixels, an output of Po pixels, 8 <= Pi * Po <= 16, at most 16 taps: 3x3 convs on 2x2
// maps): the conv of one (output channel o, input channel c) pair is a Po x Pi matrix whose entries are taps of
// weight[o, c] (zero where no tap of output pixel q reads input pixel p), one vector: lane q * Pw + p (Pw: Pi
// rounded up to a power of two, Po * Pw <= 16) holds the tap of (q, p), gathered from the taps by one permute.
// Against x's Pi pixels broadcast to every group of Pw lanes (one broadcast load from a compact copy of the
// sample's valid channels, Pw floats each), one FMA per (o, c, sample) does the whole pair: no im2col column reads
// padding (3x3 on 2x2: 16 multiply-adds per pair against 36 with the taps), and no weight tile is packed. The FMA
// is masked to the lanes some tap reads, so a NaN / Inf input reaches only the outputs that read it.
//
// Loop order: output channel outer, then every group that keeps it, its samples 8 at a time (one permute of a
// weight serves them all). A weight row (Cin x 9 floats) stays in L1 while each group reads the chunks of its own
// input channels, and a group's compact inputs (16 bytes per channel and sample on 2x2) stay in L1 across the rows:
// with per-sample masks the packed kernel gathers every sample's rows from L3 instead (64 samples x 590 KB for
// VGG-16's 512 -> 512 convs at 0.25). Against the copy of 16 floats per channel repeated for every output pixel
// (which streamed 8 KB per sample from L2 for every row) and 4 samples per permute, VGG-16-BN's 2x2 layers, op level:
// batch 64 per class 1.5-2.0x, per sample 1.16-1.23x; batch 8 per sample 1.12-1.22x; batch 1 0.96-1.04x.
struct TinyMap {
  int Pi = 0, Po = 0, Pw = 0;
  __mmask16 valid = 0;  // lanes (q, p) read by some tap
  __m512i perm;         // lane -> tap index (0 where none)
};

bool tiny_map(const ConvGeom& G, TinyMap& tm) {
  const int64_t Pi = G.HW, Po = G.P;
  if (G.khw > 16 || Pi < 2 || Pi * Po < 8 || Pi * Po > 16) return false;
  int64_t Pw = 2;
  while (Pw < Pi) Pw *= 2;
  if (Po * Pw > 16) return false;  // 3 -> 5 and 5 -> 3 pixels: the GEMM path
  alignas(64) int32_t idx[16] = {0};
  uint32_t valid = 0;
  for (int64_t q = 0; q < Po; ++q) {
    const int64_t oy = q / G.Wo, ox = q % G.Wo;
    for (int64_t ky = 0; ky < G.kh; ++ky) {
      for (int64_t kx = 0; kx < G.kw; ++kx) {
        const int64_t iy = oy * G.sh - G.ph + ky * G.dh, ix = ox * G.sw - G.pw + kx * G.dw;
        if (iy < 0 || iy >= G.H || ix < 0 || ix >= G.W) continue;
        const int64_t lane = q * Pw + iy * G.W + ix;  // distinct taps of one output pixel read distinct pixels
        idx[lane] = static_cast<int32_t>(ky * G.kw + kx);
        valid |= 1u << lane;
      }
    }
  }
  tm.Pi = static_cast<int>(Pi);
  tm.Po = static_cast<int>(Po);
  tm.Pw = static_cast<int>(Pw);
  tm.valid = static_cast<__mmask16>(valid);
  tm.perm = _mm512_load_si512(idx);
  return true;
}

thread_local ScratchBuffer tl_tiny_x;

// x's PW floats at p in every group of PW lanes
template <int PW>
inline __m512 tiny_map_x(const float* p) {
  if constexpr (PW == 2) return _mm512_castpd_ps(_mm512_set1_pd(*reinterpret_cast<const double*>(p)));
  else if constexpr (PW == 4) return _mm512_broadcast_f32x4(_mm_load_ps(p));
  else if constexpr (PW == 8)
    return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_load_pd(reinterpret_cast<const double*>(p))));
  else return _mm512_load_ps(p);
}

// sums[s] = sum over the group's valid inputs jv of (the pair matrix of weight row wrow, input channel ich[jv]) times
// the inputs of sample s (PW floats per channel at xp + s * xstride), for N samples of one group: each matrix is
// built once for the N.
template <int N, int PW>
inline void tiny_map_dot(const float* wrow, const int64_t* ich, int64_t kv, int64_t khw, const TinyMap& tm,
                         const float* xp, int64_t xstride, float (*sums)[16]) {
  const __mmask16 taps = static_cast<__mmask16>((1u << khw) - 1u);
  constexpr int U = N == 1 ? 2 : 1;  // one sample: two chains of FMAs over alternate inputs
  __m512 acc[N][U];
#pragma GCC unroll 8
  for (int s = 0; s < N; ++s)
    for (int u = 0; u < U; ++u) acc[s][u] = _mm512_setzero_ps();
  int64_t jv = 0;
  for (; jv + U <= kv; jv += U) {
#pragma GCC unroll 2
    for (int u = 0; u < U; ++u) {
      const __m512 w = _mm512_maskz_permutexvar_ps(tm.valid, tm.perm,
                                                   _mm512_maskz_loadu_ps(taps, wrow + ich[jv + u] * khw));
#pragma GCC unroll 8
      for (int s = 0; s < N; ++s)
        acc[s][u] = _mm512_mask3_fmadd_ps(w, tiny_map_x<PW>(xp + s * xstride + (jv + u) * PW), acc[s][u], tm.valid);
    }
  }
  for (; jv < kv; ++jv) {
    const __m512 w = _mm512_maskz_permutexvar_ps(tm.valid, tm.perm, _mm512_maskz_loadu_ps(taps, wrow + ich[jv] * khw));
#pragma GCC unroll 8
    for (int s = 0; s < N; ++s)
      acc[s][0] = _mm512_mask3_fmadd_ps(w, tiny_map_x<PW>(xp + s * xstride + jv * PW), acc[s][0], tm.valid);
  }
#pragma GCC unroll 8
  for (int s = 0; s < N; ++s) {
    __m512 t = acc[s][0];
    if (U > 1) t = _mm512_add_ps(t, acc[s][U - 1]);
    _mm512_store_ps(sums[s], t);
  }
}

using TinyDotFn = void (*)(const float*, const int64_t*, int64_t, int64_t, const TinyMap&, const float*, int64_t,
                           float (*)[16]);

// tiny_map_dot for 1 to 8 samples
template <int PW>
constexpr TinyDotFn kTinyDots[8] = {&tiny_map_dot<1, PW>, &tiny_map_dot<2, PW>, &tiny_map_dot<3, PW>,
                                    &tiny_map_dot<4, PW>, &tiny_map_dot<5, PW>, &tiny_map_dot<6, PW>,
                                    &tiny_map_dot<7, PW>, &tiny_map_dot<8, PW>};

template <int PW>
void run_tiny_map_pw(const Problem& pb, const TinyMap& tm, int nthreads) {
  const ConvGeom& G = pb.geo;
  const int64_t ng = static_cast<int64_t>(pb.groups.size());
  // xc[sample slot][jv]: the sample's input pixels of its jv-th valid channel, zero-padded to PW floats
  std::vector<int64_t> xoff(ng);
  int64_t total = 0;
  for (int64_t g = 0; g < ng; ++g) {
    xoff[g] = total;
    total += pb.groups[g].count * pb.groups[g].kv * PW;
  }
  float* xc = tl_tiny_x.get(static_cast<size_t>(std::max<int64_t>(total, 16)));
  for (int64_t g = 0; g < ng; ++g) {
    const GroupInfo& gi = pb.groups[g];
    const int64_t* ipos = pb.in_pos.data() + gi.in_off;
    for (int64_t si = 0; si < gi.count; ++si) {
      const float* xb = pb.x + pb.samples[gi.start + si] * G.Kin * G.HW;
      float* d = xc + xoff[g] + si * gi.kv * PW;
      for (int64_t jv = 0; jv < gi.kv; ++jv, d += PW) {
        std::memcpy(d, xb + ipos[jv] * G.HW, sizeof(float) * tm.Pi);
        std::fill(d + tm.Pi, d + PW, 0.f);
      }
    }
  }
  const ChunkEntries ce = entries_by_chunk(pb, 1);  // by output channel
  const int64_t row_stride = G.Cin * G.khw;
  // In a model run the layer's weights come from memory (the layers before evicted them), and a row's reads (a few
  // floats per kept input channel) are too scattered for the hardware prefetcher: the lines of a row that some group
  // reads are prefetched into L2 while the row before runs. Per-sample VGG-16-BN 2x2 layers at batch 64, in the model
  // (paired rounds, per-step times): 1.18-1.29x; one shared mask 0.96-1.02x. Two kept rows ahead instead of one:
  // 0.94-1.0x per sample, 0.98-1.02x per class.
  const std::vector<int64_t> lines = row_lines(pb);
  auto run_channel = [&](int64_t o) {
    const float* wrow = pb.w + o * row_stride;
    int64_t next = o + 1;  // the next output channel some group keeps
    while (next < G.Cout && ce.start[next + 1] == ce.start[next]) ++next;
    if (next < G.Cout) {
      const char* nrow = reinterpret_cast<const char*>(pb.w + next * row_stride);
      for (const int64_t off : lines) _mm_prefetch(nrow + off, _MM_HINT_T1);
    }
    const float bv = pb.bias ? pb.bias[o] : 0.f;
    for (int64_t e = ce.start[o]; e < ce.start[o + 1]; ++e) {
      const auto [g, r] = ce.entries[e];
      const GroupInfo& gi = pb.groups[g];
      const int64_t* ich = pb.in_ch.data() + gi.in_off;
      const int64_t pos = pb.out_pos[gi.out_off + r];
      // the group's samples in ceil(count / 8) calls of near-equal size (a group of 9: 5 + 4, not 8 + 1)
      const int64_t calls = (gi.count + 7) / 8;
      for (int64_t s0 = 0, c = 0; c < calls; ++c) {
        const int n = static_cast<int>((gi.count - s0 + (calls - c) - 1) / (calls - c));
        alignas(64) float sums[8][16];
        kTinyDots<PW>[n - 1](wrow, ich, gi.kv, G.khw, tm, xc + xoff[g] + s0 * gi.kv * PW, gi.kv * PW, sums);
        for (int si = 0; si < n; ++si) {
          const float* acc = sums[si];
          const int64_t b = pb.samples[gi.start + s0 + si];
          float* dst = pb.out + (b * G.Kout + pos) * G.P;
          const float* res = pb.residual_at(b, pos);
          for (int q = 0; q < tm.Po; ++q) {
            float v = bv;
            for (int pi = 0; pi < tm.Pi; ++pi) v += acc[q * PW + pi];
            if (res != nullptr) v += res[q];
            if (pb.relu) v = v < 0.f ? 0.f : v;  // NaN stays NaN, as torch.relu
            dst[q] = v;
          }
        }
        s0 += n;
      }
    }
  };
  constexpr int64_t chunk = 8;  // output channels per item
  for_each_dynamic((G.Cout + chunk - 1) / chunk, nthreads, [&](int64_t c) {
    for (int64_t o = c * chunk; o < std::min((c + 1) * chunk, G.Cout); ++o) run_channel(o);
  });
}

void run_tiny_map(const Problem& pb, const TinyMap& tm, int nthreads) {
  switch (tm.Pw) {
    case 2: run_tiny_map_pw<2>(pb, tm, nthreads); break;
    case 4: run_tiny_map_pw<4>(pb, tm, nthreads); break;
    case 8: run_tiny_map_pw<8>(pb, tm, nthreads); break;
    default: run_tiny_map_pw<16>(pb, tm, nthreads); break;
  }
}

// One-pixel layers (Linear, and convs on 1 x 1 maps whose window reads the one input pixel): out[b, pos] = the dot
// of weight row o with the sample's valid inputs. The packed GEMM path gathers every group's weight rows into panels,
// each group on its own: with per-sample masks a batch-8 VGG-16 classifier.0 (25088 -> 4096) gathers 8 x 25.7 MB
// from memory. Here the output channels are cut into chunks whose weight rows fit in L2, and every group that keeps
// a row of the chunk reads it there: a row comes from memory once, whatever the number of groups.
//
// The valid inputs of a group, as columns of the weight row (channel * khw + the one tap that reads the pixel), fall
// into 16-float blocks of the row (a block: its column and lane mask). Per group and row, the valid weights are
// compacted block by block (a masked load, never reading a pruned weight, and an in-register compress) into a
// thread-local row of kv floats, then dotted with the group's inputs in the same order (built once per call),
// in register tiles of up to 4 rows x 4 samples of the group. Every (row, sample) sum is one chain over its group's
// compacted inputs in one order, whatever the tile and the other samples: a sample's output does not depend on the
// rest of the batch.
struct OnePixel {
  int64_t tap = -1;              // the tap that reads the input pixel (-1: none, the output is the bias)
  std::vector<int64_t> boff;     // per group: first block (boff[ng]: total)
  std::vector<int64_t> kpad;     // per group: valid inputs, rounded up to a multiple of 16
  std::vector<int64_t> xoff;     // per group: offset of its compacted inputs (kpad floats per sample)
  std::vector<int64_t> col;      // per block: first column of the weight row
  std::vector<__mmask16> lanes;  // per block: valid lanes
};

// dst + r * (kp + 16) = the valid weights of row wrow[r], r < rows, block by block, zero up to kp (each block
// stores 16 floats: the 16 of slack take the last one's tail). The rows advance together: several streams of loads
// in flight when they come from memory.
inline void compact_rows(const float* const* wrow, int rows, const int64_t* col, const __mmask16* lanes, int64_t nb,
                         int64_t kp, float* dst) {
  const int64_t stride = kp + 16;
  int64_t n = 0;
  // Blocks prefetched ahead into L2: more lines in flight than the loads alone keep (per-sample VGG-16 classifier.0
  // at batch 8, one thread: 25-27 ms against 32-37 without, or with prefetches into L1).
  constexpr int64_t kAhead = 48;
  for (int64_t i = 0; i < nb; ++i) {
    const __mmask16 m = lanes[i];
    if (i + kAhead < nb)
      for (int r = 0; r < rows; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(wrow[r] + col[i + kAhead]), _MM_HINT_T1);
    for (int r = 0; r < rows; ++r)
      _mm512_storeu_ps(dst + r * stride + n, _mm512_maskz_compress_ps(m, _mm512_maskz_loadu_ps(m, wrow[r] + col[i])));
    n += _mm_popcnt_u32(m);
  }
  for (int r = 0; r < rows && n % 16; ++r) _mm512_storeu_ps(dst + r * stride + n, _mm512_setzero_ps());
}

// Lane 4 s + r of the result = the sum of the 16 lanes of v[4 r + s], r, s < 4, added pairwise as
// _mm512_reduce_add_ps does (lanes i and i + 8, then i and i + 4, i and i + 2, i and i + 1): one sum's rounding
// does not depend on the other 15 (three shuffles and an add per level instead of 16 reductions).
__attribute__((always_inline)) inline __m512 reduce16(const __m512* v) {
  __m512 u[8], z[4], y[2];
  for (int m = 0; m < 8; ++m)  // [v[2m] 0..7 + 8..15 | v[2m+1] 0..7 + 8..15]
    u[m] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * m], v[2 * m + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * m], v[2 * m + 1], 0xEE));
  for (int m = 0; m < 4; ++m)  // 128-bit blocks 0 + 1 and 2 + 3 of each
    z[m] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * m], u[2 * m + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * m], u[2 * m + 1], 0xDD));
  for (int m = 0; m < 2; ++m)  // per block: lanes 0 + 2, 1 + 3
    y[m] = _mm512_add_ps(_mm512_shuffle_ps(z[2 * m], z[2 * m + 1], 0x44),
                         _mm512_shuffle_ps(z[2 * m], z[2 * m + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));  // lanes 0 + 1
}

// sums[4 s + r] = dot of compacted row w + r * (kp + 16) with the inputs of sample s (x + s * kp), kp floats each.
template <int R, int N>
inline void one_pixel_tile(const float* w, const float* x, int64_t kp, float* sums) {
  __m512 acc[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kp; k += 16) {
    __m512 wv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      wv[r] = _mm512_load_ps(w + r * (kp + 16) + k);
      asm("" : "+v"(wv[r]));  // in a register: GCC would fold the loads into every FMA (16 loads per 16 FMAs)
    }
#pragma GCC unroll 4
    for (int s = 0; s < N; ++s) {
      __m512 xv = _mm512_load_ps(x + s * kp + k);
      asm("" : "+v"(xv));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[4 * r + s] = _mm512_fmadd_ps(wv[r], xv, acc[4 * r + s]);
    }
  }
  _mm512_storeu_ps(sums, reduce16(acc));
}

using OnePixelTileFn = void (*)(const float*, const float*, int64_t, float*);

template <int R>
OnePixelTileFn pick_tile_n(int n) {
  switch (n) {
    case 1: return &one_pixel_tile<R, 1>;
    case 2: return &one_pixel_tile<R, 2>;
    case 3: return &one_pixel_tile<R, 3>;
    default: return &one_pixel_tile<R, 4>;
  }
}

OnePixelTileFn pick_tile(int rows, int n) {
  switch (rows) {
    case 1: return pick_tile_n<1>(n);
    case 2: return pick_tile_n<2>(n);
    case 3: return pick_tile_n<3>(n);
    default: return pick_tile_n<4>(n);
  }
}

thread_local ScratchBuffer tl_xcompact;
thread_local ScratchBuffer tl_wcompact;

// Taken for rows of at least kOnePixelMinWidth weights (VGG-16's 25088 / 4096-wide classifier layers), where the
// weight is the layer's memory traffic. Narrower layers (ResNet heads, 32x32 models' classifiers, small-map convs)
// stay in cache between groups, and there the packed GEMM path is faster (compute-bound: 0.5-0.8x with the
// one-pixel path at batch 64). A property of the layer alone: every sample of every batch takes the same path.
constexpr int64_t kOnePixelMinWidth = 4096;

bool one_pixel(const ConvGeom& G) { return G.HW == 1 && G.P == 1 && G.Cin * G.khw >= kOnePixelMinWidth; }

void run_one_pixel(const Problem& pb, int nthreads) {
  const ConvGeom& G = pb.geo;
  const int64_t ng = static_cast<int64_t>(pb.groups.size());
  OnePixel op;
  for (int64_t ky = 0; ky < G.kh; ++ky)
    for (int64_t kx = 0; kx < G.kw; ++kx)
      if (ky * G.dh == G.ph && kx * G.dw == G.pw) op.tap = ky * G.kw + kx;
  const int64_t row_stride = G.Cin * G.khw;
  // blocks of every group: its valid inputs are strictly increasing channels (the op's contract), so their columns
  // are too, and compacting a row block by block keeps the order of the inputs
  op.boff.assign(ng + 1, 0);
  op.kpad.assign(ng, 0);
  op.xoff.assign(ng + 1, 0);
  int64_t kmax = 16;
  for (int64_t g = 0; g < ng; ++g) {
    const GroupInfo& gi = pb.groups[g];
    const int64_t* ich = pb.in_ch.data() + gi.in_off;
    for (int64_t jv = 0; jv < gi.kv && op.tap >= 0; ++jv) {
      const int64_t c = ich[jv] * G.khw + op.tap;
      if (static_cast<int64_t>(op.col.size()) == op.boff[g] || op.col.back() != c / 16 * 16) {
        op.col.push_back(c / 16 * 16);
        op.lanes.push_back(0);
      }
      op.lanes.back() |= static_cast<__mmask16>(1u << (c % 16));
    }
    op.boff[g + 1] = static_cast<int64_t>(op.col.size());
    op.kpad[g] = op.tap >= 0 ? (gi.kv + 15) / 16 * 16 : 0;
    op.xoff[g + 1] = op.xoff[g] + gi.count * op.kpad[g];
    kmax = std::max(kmax, op.kpad[g]);
  }
  // inputs: sample si of group g at xc + xoff[g] + si * kpad[g], its kv valid inputs then zeros
  float* xc = tl_xcompact.get(static_cast<size_t>(std::max<int64_t>(op.xoff[ng], 16)));
  for (int64_t g = 0; g < ng; ++g) {
    const GroupInfo& gi = pb.groups[g];
    const int64_t* ipos = pb.in_pos.data() + gi.in_off;
    for (int64_t si = 0; si < gi.count; ++si) {
      const float* xb = pb.x + pb.samples[gi.start + si] * G.Kin;
      float* d = xc + op.xoff[g] + si * op.kpad[g];
      for (int64_t jv = 0; jv < op.kpad[g]; ++jv) d[jv] = jv < gi.kv ? xb[ipos[jv]] : 0.f;
    }
  }
  // Chunks of output channels whose rows fit in L2; per chunk its (group, entry) pairs by group.
  const int64_t chunk = std::clamp<int64_t>((int64_t{1} << 20) / std::max<int64_t>(4 * row_stride, 1), 4, 64);
  const ChunkEntries ce = entries_by_chunk(pb, chunk);
  auto run_chunk = [&](int64_t c) {
    float* wc = tl_wcompact.get(static_cast<size_t>(4 * (kmax + 16)));
    for (int64_t e0 = ce.start[c]; e0 < ce.start[c + 1];) {
      const int64_t g = ce.entries[e0].first;
      int64_t e1 = e0 + 1;
      while (e1 < ce.start[c + 1] && e1 - e0 < 4 && ce.entries[e1].first == g) ++e1;
      const GroupInfo& gi = pb.groups[g];
      const int rows = static_cast<int>(e1 - e0);
      const int64_t kp = op.kpad[g], b0 = op.boff[g];
      const float* wrow[4];
      int64_t pos[4];
      float bias[4];
      for (int r = 0; r < rows; ++r) {
        const int64_t o = pb.out_ch[gi.out_off + ce.entries[e0 + r].second];
        wrow[r] = pb.w + o * row_stride;
        pos[r] = pb.out_pos[gi.out_off + ce.entries[e0 + r].second];
        bias[r] = pb.bias ? pb.bias[o] : 0.f;
      }
      compact_rows(wrow, rows, op.col.data() + b0, op.lanes.data() + b0, op.boff[g + 1] - b0, kp, wc);
      for (int64_t s0 = 0; s0 < gi.count; s0 += 4) {
        const int n = static_cast<int>(std::min<int64_t>(4, gi.count - s0));
        alignas(64) float sums[16] = {};
        if (kp > 0) pick_tile(rows, n)(wc, xc + op.xoff[g] + s0 * kp, kp, sums);
        for (int si = 0; si < n; ++si) {  // epilogue: bias, residual, ReLU
          const int64_t b = pb.samples[gi.start + s0 + si];
          float* dst = pb.out + b * G.Kout;
          for (int r = 0; r < rows; ++r) {
            float v = sums[4 * si + r] + bias[r];
            if (const float* res = pb.residual_at(b, pos[r])) v += *res;
            if (pb.relu) v = v < 0.f ? 0.f : v;  // NaN stays NaN, as torch.relu
            dst[pos[r]] = v;
          }
        }
      }
      e0 = e1;
    }
  };
  for_each_dynamic(static_cast<int64_t>(ce.start.size()) - 1, nthreads, run_chunk);
}

// Vector maps (13 to 16 output pixels per sample, a sample's map one vector: the 4x4 maps of the 32x32 models' last
// stage). The GEMM path packs each group's weight tiles on its own: with per-sample masks a batch of 64 gathers (8x8
// transposes) 64 x 590 KB of a 9.4 MB 512 -> 512 layer, each weight then used for one sample's 16 pixels only, so the
// packing cost about as much as the FMAs; and a 16-pixel sample fills a 12-column panel and a third of another. Here
// a sample's pixels are the lanes of one vector, and a tile of 16 output channels x 1 sample broadcasts its weights
// from the weight rows in place (no packing): acc[r] += weight[row r][channel, tap] * (the sample's pixels that tap
// reads). The sums run over k = valid input * khw + tap in the order of the GEMM path: the same bits. Tiles of all
// groups run in the order of their first weight row, so the groups that keep a row read it while it is still in
// cache (per sample, 512 -> 512: 1.05-1.10x against group by group; prefetching the rows of the tiles 8 ahead gained
// nothing and was dropped).
//
// The pixels a tap reads: for inputs of at most 16 pixels, one permute of the channel's pixel vector (fused into
// the tile); for 17 to 64 (a stride-2 conv from 8x8) an im2col of the sample built per tile (K x 16 floats, L1/L2).
// Paired A/B against the GEMM path (captured calls of VGG-16-BN / ResNet-18 at 32x32, batch 64, density 0.25,
// median of 15, 2 threads, Zen 4 VM): 3x3 on 4x4, per sample 1.43-1.62x, per class 1.15-1.21x, shared 1.02-1.25x;
// 3x3 stride 2 from 8x8, per sample 1.15-1.30x, per class / shared 0.85-1.0x (kept for the per-sample case). A 1x1
// stride-2 conv from 8x8 lost 0.92x shared (its im2col per tile costs as much as its 16 FMAs per input) and keeps
// the GEMM path.
constexpr int64_t kVectorMapMinP = 13;
bool vector_map(const ConvGeom& G) {
  return G.P >= kVectorMapMinP && G.P <= 16 && (G.HW <= 16 || (G.HW <= 64 && G.khw > 1));
}

thread_local ScratchBuffer tl_xcol;

// Per tap: lane q (output pixel) -> the input pixel its window reads, 16 where it reads padding (or q >= P): the
// fused tile's permute takes lane 0 of its zero vector there, and the im2col zeroes the lanes outside `valid`;
// `upper`: lanes reading a pixel in [32, 64). (The index table as 64-byte aligned int32 arrays: a std::vector of
// __m512i drops the type's may_alias attribute.)
struct alignas(64) LaneIndex {
  int32_t v[16];
};

struct VectorMapTaps {
  std::vector<LaneIndex> idx;
  std::vector<__mmask16> valid, upper;
};

VectorMapTaps vector_map_taps(const ConvGeom& G) {
  VectorMapTaps taps;
  for (int64_t ky = 0; ky < G.kh; ++ky) {
    for (int64_t kx = 0; kx < G.kw; ++kx) {
      LaneIndex idx;
      uint32_t valid = 0, upper = 0;
      for (int64_t q = 0; q < 16; ++q) {
        idx.v[q] = 16;
        const int64_t iy = (q / G.Wo) * G.sh - G.ph + ky * G.dh, ix = (q % G.Wo) * G.sw - G.pw + kx * G.dw;
        if (q >= G.P || iy < 0 || iy >= G.H || ix < 0 || ix >= G.W) continue;
        idx.v[q] = static_cast<int32_t>(iy * G.W + ix);
        valid |= 1u << q;
        if (idx.v[q] >= 32) upper |= 1u << q;
      }
      taps.idx.push_back(idx);
      taps.valid.push_back(static_cast<__mmask16>(valid));
      taps.upper.push_back(static_cast<__mmask16>(upper));
    }
  }
  return taps;
}

// dst[(jv * khw + t) * 16 + q] = the pixel tap t of output pixel q reads in the jv-th valid channel of the sample
// at xb (0 where it reads padding), for inputs of 17 to 64 pixels.
void vector_map_im2col(const Problem& pb, const GroupInfo& gi, const VectorMapTaps& taps, const float* xb,
                      float* __restrict dst) {
  const int64_t* ipos = pb.in_pos.data() + gi.in_off;
  const int64_t Pi = pb.geo.HW, khw = pb.geo.khw;
  __mmask16 part[4];  // lanes of the i-th 16 input pixels
  for (int i = 0; i < 4; ++i)
    part[i] = static_cast<__mmask16>((1u << std::clamp<int64_t>(Pi - 16 * i, 0, 16)) - 1u);
  for (int64_t jv = 0; jv < gi.kv; ++jv) {
    const float* src = xb + ipos[jv] * Pi;
    const __m512 v0 = _mm512_maskz_loadu_ps(part[0], src), v1 = _mm512_maskz_loadu_ps(part[1], src + 16);
    const __m512 v2 = _mm512_maskz_loadu_ps(part[2], src + 32), v3 = _mm512_maskz_loadu_ps(part[3], src + 48);
    float* d = dst + jv * khw * 16;
    for (int64_t t = 0; t < khw; ++t) {
      const __m512i idx = _mm512_load_si512(taps.idx[t].v);
      const __m512 lo = _mm512_permutex2var_ps(v0, idx, v1), hi = _mm512_permutex2var_ps(v2, idx, v3);
      _mm512_store_ps(d + t * 16, _mm512_maskz_mov_ps(taps.valid[t], _mm512_mask_blend_ps(taps.upper[t], lo, hi)));
    }
  }
}

// Ct[r * 16 + q] = sum over k = jv * khw + t, ascending, of weight row wrows[r] at (ich[jv], t) times the pixel
// that tap t of output pixel q reads in the sample's jv-th valid channel: xcol[k * 16 + q] (vector_map_im2col).
template <int KHW>
__attribute__((noinline)) void vector_map_tile(const float* const* wrows, const int64_t* __restrict ich, int64_t kv,
                                               int64_t khw_rt, const float* __restrict xcol, float* __restrict Ct) {
  const int64_t khw = KHW > 0 ? KHW : khw_rt;
  __m512 acc[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t jv = 0; jv < kv; ++jv) {
    const int64_t off = ich[jv] * khw;
    const float* xp = xcol + jv * khw * 16;
#pragma GCC unroll 9
    for (int64_t t = 0; t < khw; ++t) {
      const __m512 xv = _mm512_load_ps(xp + t * 16);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(wrows[r][off + t]), xv, acc[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) _mm512_store_ps(Ct + r * 16, acc[r]);
}

// vector_map_tile for inputs of at most 16 pixels, the im2col fused: the pixels of tap t are one permute of the
// channel's pixel vector (index 16, the zero vector's first lane, where the tap reads padding). A separate function
// rather than a template flag of vector_map_tile: merged, GCC allocated the registers of this loop worse (7-9 %
// slower per sample in paired runs). Both stay out of line, as measured (inlined into the tile loop, their register
// allocation would again be left to the caller's).
template <int KHW>
__attribute__((noinline)) void vector_map_tile_fused(const float* const* wrows, const int64_t* __restrict ich,
                                                     const int64_t* __restrict ipos, int64_t kv, int64_t khw_rt,
                                                     const LaneIndex* tidx, __mmask16 pixels, const float* xb,
                                                     int64_t HW, float* __restrict Ct) {
  const int64_t khw = KHW > 0 ? KHW : khw_rt;
  const __m512 zero = _mm512_setzero_ps();
  __m512 acc[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t jv = 0; jv < kv; ++jv) {
    const int64_t off = ich[jv] * khw;
    const __m512 v = _mm512_maskz_loadu_ps(pixels, xb + ipos[jv] * HW);
#pragma GCC unroll 9
    for (int64_t t = 0; t < khw; ++t) {
      const __m512 xv = _mm512_permutex2var_ps(v, _mm512_load_si512(tidx[t].v), zero);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(wrows[r][off + t]), xv, acc[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) _mm512_store_ps(Ct + r * 16, acc[r]);
}

void run_vector_map(const Problem& pb, int nthreads) {
  const ConvGeom& G = pb.geo;
  const VectorMapTaps taps = vector_map_taps(G);
  const bool fused = G.HW <= 16;
  const __mmask16 pixels = static_cast<__mmask16>((1u << std::min<int64_t>(G.HW, 16)) - 1u);
  // (first weight row, group, tile) of every 16-row tile, by first weight row
  std::vector<std::tuple<int64_t, int64_t, int64_t>> tiles;
  for (int64_t g = 0; g < static_cast<int64_t>(pb.groups.size()); ++g) {
    const GroupInfo& gi = pb.groups[g];
    for (int64_t mt = 0; mt * MR < gi.mv; ++mt) tiles.emplace_back(pb.out_ch[gi.out_off + mt * MR], g, mt);
  }
  std::sort(tiles.begin(), tiles.end());
  const int64_t ntiles = static_cast<int64_t>(tiles.size());
  const __mmask16 lanes = static_cast<__mmask16>((1u << G.P) - 1u);
  const int64_t row_stride = G.Cin * G.khw;
  for_each_dynamic(ntiles, nthreads, [&](int64_t i) {
    const auto [first, g, mt] = tiles[i];
    const GroupInfo& gi = pb.groups[g];
    const int rows = static_cast<int>(std::min<int64_t>(MR, gi.mv - mt * MR));
    const int64_t* opos = pb.out_pos.data() + gi.out_off + mt * MR;
    const int64_t* och = pb.out_ch.data() + gi.out_off + mt * MR;
    const float* wrows[MR];
    for (int r = 0; r < MR; ++r) wrows[r] = pb.w + och[r < rows ? r : 0] * row_stride;  // past rows: not stored
    const int64_t* ich = pb.in_ch.data() + gi.in_off;
    const int64_t* ipos = pb.in_pos.data() + gi.in_off;
    float* xcol = fused ? nullptr : tl_xcol.get(static_cast<size_t>(std::max<int64_t>(gi.kv * G.khw, 1) * 16));
    alignas(64) float Ct[MR * 16];
    for (int64_t si = 0; si < gi.count; ++si) {
      const int64_t b = pb.samples[gi.start + si];
      const float* xb = pb.x + b * G.Kin * G.HW;
      if (fused) {
        if (G.khw == 9) vector_map_tile_fused<9>(wrows, ich, ipos, gi.kv, 9, taps.idx.data(), pixels, xb, G.HW, Ct);
        else vector_map_tile_fused<0>(wrows, ich, ipos, gi.kv, G.khw, taps.idx.data(), pixels, xb, G.HW, Ct);
      } else {
        vector_map_im2col(pb, gi, taps, xb, xcol);
        if (G.khw == 9) vector_map_tile<9>(wrows, ich, gi.kv, 9, xcol, Ct);
        else vector_map_tile<0>(wrows, ich, gi.kv, G.khw, xcol, Ct);
      }
      pixel_epilogue(pb, rows, opos, och, b, b * G.Kout * G.P, b * pb.res_K * G.P, lanes, Ct);
    }
  });
}
#endif

// Work items: per group, column blocks whose B source stays in L2 while every weight tile streams over it, split
// into enough items for dynamic load balance (groups differ in size), few enough that the packing duplicated at
// split boundaries stays negligible.
std::vector<WorkItem> work_items(Problem& pb, int nthreads) {
  const ConvGeom& G = pb.geo;
  double total_cost = 0;
  for (auto& gi : pb.groups) {
    const int64_t K = gi.kv * G.khw;
    const int64_t N = gi.count * G.P;
    const double bytes_per_col = std::max(4.0, 4.0 * gi.kv * G.plane / static_cast<double>(G.P));
    int64_t nc = std::max<int64_t>(NR, static_cast<int64_t>(kBBlockBytes / bytes_per_col) / NR * NR);
    if (N <= nc + nc / 2) nc = (N + NR - 1) / NR * NR;  // one block
    gi.nc = std::max<int64_t>(nc, NR);
    if (gi.mv > 0) total_cost += static_cast<double>(N) * gi.mv * (K + 8);
  }
  const int64_t target_items = nthreads > 1 ? 8 * nthreads : 1;
  std::vector<WorkItem> items;
  for (int64_t g = 0; g < static_cast<int64_t>(pb.groups.size()); ++g) {
    const GroupInfo& gi = pb.groups[g];
    if (gi.mv == 0) continue;
    const int64_t K = gi.kv * G.khw;
    const int64_t N = gi.count * G.P;
    const int64_t nb = (N + gi.nc - 1) / gi.nc;
    const int64_t mtiles = (gi.mv + MR - 1) / MR;
    const double cost = static_cast<double>(N) * gi.mv * (K + 8);
    const int64_t want = std::max<int64_t>(1, static_cast<int64_t>(cost / total_cost * target_items + 0.5));
    const int64_t ncs = std::min(nb, want);
    const int64_t ms = std::min(mtiles, (want + ncs - 1) / ncs);
    for (int64_t a = 0; a < ncs; ++a) {
      const int64_t b0 = nb * a / ncs, b1 = nb * (a + 1) / ncs;
      for (int64_t m = 0; m < ms; ++m) {
        WorkItem it;
        it.g = g;
        it.c0 = b0 * gi.nc;
        it.c1 = std::min(b1 * gi.nc, N);
        it.m0 = mtiles * m / ms;
        it.m1 = mtiles * (m + 1) / ms;
        if (it.c1 > it.c0 && it.m1 > it.m0) items.push_back(it);
      }
    }
  }
  return items;
}

}  // namespace

at::Tensor gathered_conv2d_cpu(const at::Tensor& x, const at::Tensor& in_idx, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& out_idx,
                               const at::Tensor& sample_group, const c10::optional<at::Tensor>& residual,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                               const c10::optional<at::Tensor>& problems, int64_t max_group,
                               bool check_indices, const c10::optional<at::Tensor>& residual_take) {
  static const at::ScalarType kDtypes[] = {at::kFloat};
  GatheredConvParams p = gathered_conv_params(x, in_idx, weight, bias, out_idx, sample_group, residual, stride,
                                              padding, dilation, relu, problems, max_group, check_indices,
                                              residual_take, /*fuse_residual_take=*/true, kDtypes,
                                              c10::DeviceType::CPU);
  if (p.kh == 1 && p.kw == 1 && p.ph == 0 && p.pw == 0 && (p.sh > 1 || p.sw > 1) && p.Ho * p.Wo >= 128) {
    // A strided 1x1 conv (ResNet's downsample) reads one pixel in sh x sw: subsample the compacted input once
    // (a quarter of it for stride 2) and run the stride-1 layer, which takes the pixel-vectorised path.
    p.x = p.x.slice(2, 0, p.H, p.sh).slice(3, 0, p.W, p.sw).contiguous();
    p.H = p.Ho, p.W = p.Wo, p.sh = p.sw = 1;
  }
  auto out = at::empty({p.B, p.Kout, p.Ho, p.Wo}, p.x.options().memory_format(at::MemoryFormat::Contiguous));
  if (p.empty_output()) return out;
  Problem pb = describe(p, out);
  const int nthreads = std::max(1, at::get_num_threads());
#if defined(GENCNP_AVX512)
  TinyMap tm;
  if (tiny_map(pb.geo, tm)) {
    run_tiny_map(pb, tm, nthreads);
    return out;
  }
  if (one_pixel(pb.geo)) {
    run_one_pixel(pb, nthreads);
    return out;
  }
  if (vector_map(pb.geo)) {
    run_vector_map(pb, nthreads);
    return out;
  }
#endif
  const std::vector<WorkItem> items = work_items(pb, nthreads);
  for_each_dynamic(static_cast<int64_t>(items.size()), nthreads, [&](int64_t i) { run_item(pb, items[i]); });
  return out;
}

int64_t cpu_one_pixel_min_width() {
#if defined(GENCNP_AVX512)
  return kOnePixelMinWidth;
#else
  return std::numeric_limits<int64_t>::max();  // no one-pixel path: every layer takes the GEMM path
#endif
}

TORCH_LIBRARY_IMPL(gencnp_fast, CPU, m) {
  m.impl("gathered_conv2d", &gathered_conv2d_cpu);
}

}  // namespace gencnp_fast
