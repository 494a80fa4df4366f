// CUDA kernels of gencnp_fast::gathered_conv2d (schema in csrc/ops.cpp).
//
//   out[b, j] = act(bias[o] + sum_{j' < n_in(b)} conv(x[b, j'], weight[o, in_idx[b, j']]) + residual[b, j])
//   o = out_idx[b, j];  out[b, j] = 0 exactly where out_idx[b, j] == -1
//
// Implicit GEMM over a grouped problem list, one launch for the whole batch (the same mapping as the Triton
// kernel in gencnp_fast/kernels/triton_conv.py):
//   * one problem per group of samples sharing a mask (`sample_group`); problem g is
//       C[M, N] = A[M, K] * W[K, N],  M = cnt_g * Ho * Wo (output pixels of all its samples: one gathered weight
//       tile serves all of them), N = n_out (active output channels), K = n_in * kh * kw
//     with k = j * kh*kw + r * kw + s (j: position in the compact input = the list of active input channels);
//   * A tiles are gathered from x (im2col fused into the load, out-of-image taps read as 0), W tiles from the
//     plain [C_out, C_in, kh, kw] weight in place (W[k, n] = weight[out_idx[n], in_idx[j], r, s]);
//   * the epilogue adds bias[out_idx] and the residual, applies ReLU, and stores to the compact output
//     position (scatter fused into the store); padding columns (out_idx == -1) are written as exact zeros.
// grid = (M tiles of the largest group, N tiles of Kout, groups); blocks past their group's ragged M return.
//
// Three kernels, by shape and dtype (every global read is bounds-checked):
//   * float32, M > kSmallM: CUDA-core FMA (exact float32, no TF32). Tile BM x BN x 16 with BM * BN = 4096 and
//     BN = 16 / 32 / 64 picked from Kout (a per-sample mask at density 0.25 has 16 active outputs in a 64-channel
//     layer: a 64-wide tile would compute 4x the work), 256 threads each a 4 x 4 sub-tile read from shared memory
//     as float4; the next K tile's global loads are issued into registers before the current tile's FMAs, and the
//     (j, r, s) of a thread's taps advance without divisions.
//   * float16 / bfloat16, M > kSmallM: tensor cores through WMMA m16n16k16 (8 warps, each a 16 x 32 sub-tile of a
//     64 x 64 x 16 tile), sm_80+.
//   * any dtype, M <= kSmallM (linear layers and tiny maps with a per-sample mask): a GEMM tile would be almost
//     all padding rows, so one warp computes one output column for all M rows, its lanes splitting K; blocks of
//     one column tile run side by side over the groups (blockIdx.x = group) and share the weight rows in L2.
// Shared memory holds A as [BK][BM], W as [BK][BN] and the result as [BN][BM] (float), so the epilogue writes
// consecutive output pixels from consecutive threads.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../gathered_conv_params.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

namespace gencnp_fast {
namespace {

constexpr int BM = 64;
constexpr int BN = 64;
constexpr int BK = 16;
constexpr int NT = 256;  // threads per block (8 warps)
static_assert(NT % BM == 0 && (BM * BK) % NT == 0, "A tile load mapping");
static_assert(NT % BK == 0 && (BK * BN) % NT == 0, "W tile load mapping");
static_assert(NT == 256 && BM == 64 && BN == 64, "the SIMT and WMMA warp layouts assume 256 threads, 64 x 64");

// ---- scalar conversions that do not rely on the implicit half/bfloat16 operators (torch builds with
// -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__)
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Device element type of an ATen scalar type (same bit layout: at::Half == __half, at::BFloat16 == bf16).
template <typename S>
struct DeviceType {
  using type = S;
};
template <>
struct DeviceType<at::Half> {
  using type = __half;
};
template <>
struct DeviceType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T, bool USE_WMMA>
__global__ void __launch_bounds__(NT) gathered_conv2d_kernel(
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias, const T* __restrict__ res,
    T* __restrict__ out, const int* __restrict__ in_idx, const int* __restrict__ out_idx,
    const int* __restrict__ n_in_arr, const int* __restrict__ n_out_arr, const int* __restrict__ samples,
    const int* __restrict__ gstart, const int* __restrict__ gcount, int Kin, int Kout, int H, int W, int Ho,
    int Wo, int Cin, int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw, bool relu) {
  __shared__ __align__(128) T As[BK][BM];
  __shared__ __align__(128) T Bs[BK][BN];
  __shared__ __align__(128) float Cs[BN][BM];
  __shared__ int s_sample[BM];  // sample of each tile row, -1 past the group's rows
  __shared__ int s_oc[BN];      // output channel of each tile column, -1 if inactive / padding

  const int g = blockIdx.z;
  const int start = gstart[g];
  const int cnt = gcount[g];
  const int64_t HoWo = static_cast<int64_t>(Ho) * Wo;
  const int64_t m_total = static_cast<int64_t>(cnt) * HoWo;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  if (m0 >= m_total) return;  // uniform over the block: nothing of this group here
  const int rep = samples[start];  // all samples of the group share its index rows
  const int nin = n_in_arr[rep];
  const int nout = n_out_arr[rep];
  const int n0 = blockIdx.y * BN;
  const int tid = threadIdx.x;
  const int KK = kh * kw;

  if (tid < BM) {
    const int64_t m = m0 + tid;
    s_sample[tid] = (m < m_total) ? samples[start + static_cast<int>(m / HoWo)] : -1;
  } else if (tid < BM + BN) {
    const int n = n0 + (tid - BM);
    s_oc[tid - BM] = (n < nout) ? out_idx[static_cast<int64_t>(rep) * Kout + n] : -1;
  }
  __syncthreads();

  // A loads: thread tid always fills row a_m, columns a_k0 + (NT / BM) * i
  const int a_m = tid % BM;
  const int a_k0 = tid / BM;
  const int a_b = s_sample[a_m];
  const bool a_row_ok = a_b >= 0;
  int ih0 = 0, iw0 = 0;
  const T* x_b = x;
  if (a_row_ok) {
    const int pix = static_cast<int>((m0 + a_m) % HoWo);
    const int oh = pix / Wo, ow = pix - (pix / Wo) * Wo;
    ih0 = oh * sh - ph;
    iw0 = ow * sw - pw;
    x_b = x + static_cast<int64_t>(a_b) * Kin * H * W;
  }
  // W loads: thread tid always fills row b_k, columns b_n0 + (NT / BK) * i
  const int b_k = tid % BK;
  const int b_n0 = tid / BK;
  const int64_t w_row = static_cast<int64_t>(Cin) * KK;

  // Reduction length: empty when no column of this tile is an active output channel.
  const int k_total = (n0 < nout) ? nin * KK : 0;

  // SIMT accumulators (float32 path): rows ty + 16 * i, columns tx + 16 * jj
  const int tx = tid % 16, ty = tid / 16;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) acc[i][jj] = 0.f;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  constexpr bool kWmma = false;
#else
  constexpr bool kWmma = USE_WMMA;
#endif
  const int warp = tid / 32;
  const int warp_m = warp % 4;  // rows warp_m * 16 .. + 16
  const int warp_n = warp / 4;  // columns warp_n * 32 .. + 32 (two 16-wide fragments)
  using namespace nvcuda;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> cfrag[2];
  if constexpr (kWmma) {
    wmma::fill_fragment(cfrag[0], 0.f);
    wmma::fill_fragment(cfrag[1], 0.f);
  }

  for (int k0 = 0; k0 < k_total; k0 += BK) {
    // ---- gather the A tile: x[b, j, ih, iw] for the tile's pixels and (j, r, s) columns
#pragma unroll
    for (int i = 0; i < (BM * BK) / NT; ++i) {
      const int kk = a_k0 + (NT / BM) * i;
      const int k = k0 + kk;
      float v = 0.f;
      if (a_row_ok && k < k_total) {
        const int j = k / KK;
        const int rs = k - j * KK;
        const int r = rs / kw;
        const int s = rs - r * kw;
        const int ih = ih0 + r * dh;
        const int iw = iw0 + s * dw;
        if (ih >= 0 && ih < H && iw >= 0 && iw < W) {
          v = to_f32(x_b[static_cast<int64_t>(j) * H * W + static_cast<int64_t>(ih) * W + iw]);
        }
      }
      As[kk][a_m] = from_f32<T>(v);
    }
    // ---- gather the W tile: weight[out_idx[n], in_idx[j], r, s]
    {
      const int k = k0 + b_k;
      const bool k_ok = k < k_total;
      int64_t w_k = 0;
      if (k_ok) {
        const int j = k / KK;
        const int rs = k - j * KK;
        const int c = in_idx[static_cast<int64_t>(rep) * Kin + j];  // j < nin <= Kin: a valid channel
        w_k = static_cast<int64_t>(c) * KK + rs;
      }
#pragma unroll
      for (int i = 0; i < (BK * BN) / NT; ++i) {
        const int n = b_n0 + (NT / BK) * i;
        const int oc = s_oc[n];
        float v = 0.f;
        if (k_ok && oc >= 0) v = to_f32(w[static_cast<int64_t>(oc) * w_row + w_k]);
        Bs[b_k][n] = from_f32<T>(v);
      }
    }
    __syncthreads();

    if constexpr (kWmma) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> afrag;
      wmma::load_matrix_sync(afrag, &As[0][warp_m * 16], BM);  // (m, k) at As[k][m]
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bfrag;
        wmma::load_matrix_sync(bfrag, &Bs[0][warp_n * 32 + f * 16], BN);  // (k, n) at Bs[k][n]
        wmma::mma_sync(cfrag[f], afrag, bfrag, cfrag[f]);
      }
    } else {
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        float a[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = to_f32(As[kk][ty + 16 * i]);
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) bv[jj] = to_f32(Bs[kk][tx + 16 * jj]);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) acc[i][jj] = fmaf(a[i], bv[jj], acc[i][jj]);
      }
    }
    __syncthreads();  // the next iteration overwrites As / Bs
  }

  // ---- results to shared memory as Cs[n][m]
  if constexpr (kWmma) {
#pragma unroll
    for (int f = 0; f < 2; ++f) {
      wmma::store_matrix_sync(&Cs[warp_n * 32 + f * 16][warp_m * 16], cfrag[f], BM, wmma::mem_col_major);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) Cs[tx + 16 * jj][ty + 16 * i] = acc[i][jj];
  }
  __syncthreads();

  // ---- epilogue: bias + residual + ReLU, zeros for padding columns, store to the compact position
  for (int e = tid; e < BM * BN; e += NT) {
    const int m = e % BM;
    const int n = e / BM;
    const int b = s_sample[m];
    const int col = n0 + n;
    if (b < 0 || col >= Kout) continue;
    const int64_t pix = (m0 + m) % HoWo;
    const int64_t o_off = (static_cast<int64_t>(b) * Kout + col) * HoWo + pix;
    const int oc = s_oc[n];
    float v = 0.f;
    if (oc >= 0) {
      v = Cs[n][m];
      if (bias != nullptr) v += to_f32(bias[oc]);
      if (res != nullptr) v += to_f32(res[o_off]);
      if (relu) v = v < 0.f ? 0.f : v;  // NaN stays NaN, as torch.relu (fmaxf would drop it)
    }
    out[o_off] = from_f32<T>(v);
  }
}

// ---- float32, M > kSmallM: BM_ x BN_ x BK tiles with BM_ * BN_ = 4096, 4 x 4 outputs per thread
template <int BN_>
__global__ void __launch_bounds__(NT) gathered_conv2d_f32_kernel(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
    const float* __restrict__ res, float* __restrict__ out, const int* __restrict__ in_idx,
    const int* __restrict__ out_idx, const int* __restrict__ n_in_arr, const int* __restrict__ n_out_arr,
    const int* __restrict__ samples, const int* __restrict__ gstart, const int* __restrict__ gcount, int Kin,
    int Kout, int H, int W, int Ho, int Wo, int Cin, int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw,
    bool relu) {
  constexpr int BM_ = 4096 / BN_;
  constexpr int A_STEP = NT / BM_;      // k distance between one thread's A elements of a tile: 1, 2 or 4
  constexpr int A_PER = BK / A_STEP;    // A elements per thread per tile: 16, 8 or 4
  constexpr int B_PER = BK * BN_ / NT;  // W elements per thread per tile: 1, 2 or 4
  constexpr int TX = BN_ / 4;           // threads along N (each 4 consecutive columns)
  static_assert(NT % BM_ == 0 && BK % A_STEP == 0 && (BK * BN_) % NT == 0 && BN_ % 4 == 0, "tile mapping");
  __shared__ __align__(16) float As[BK][BM_];
  __shared__ __align__(16) float Bs[BK][BN_];
  __shared__ __align__(16) float Cs[BN_][BM_];
  __shared__ int s_sample[BM_];  // sample of each tile row, -1 past the group's rows
  __shared__ int s_pix[BM_];     // output pixel (oh * Wo + ow) of each tile row
  __shared__ int s_oc[BN_];      // output channel of each tile column, -1 if inactive / padding

  const int g = blockIdx.z;
  const int start = gstart[g];
  const int cnt = gcount[g];
  const int64_t HoWo = static_cast<int64_t>(Ho) * Wo;
  const int64_t m_total = static_cast<int64_t>(cnt) * HoWo;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM_;
  if (m0 >= m_total) return;  // uniform over the block: nothing of this group here
  const int rep = samples[start];  // all samples of the group share its index rows
  const int nin = n_in_arr[rep];
  const int nout = n_out_arr[rep];
  const int n0 = blockIdx.y * BN_;
  const int tid = threadIdx.x;
  const int KK = kh * kw;

  for (int i = tid; i < BM_; i += NT) {
    const int64_t m = m0 + i;
    const bool ok = m < m_total;
    s_sample[i] = ok ? samples[start + static_cast<int>(m / HoWo)] : -1;
    s_pix[i] = ok ? static_cast<int>(m % HoWo) : 0;
  }
  for (int i = tid; i < BN_; i += NT) {
    const int n = n0 + i;
    s_oc[i] = (n < nout) ? out_idx[static_cast<int64_t>(rep) * Kout + n] : -1;
  }
  __syncthreads();

  // A loads: thread tid fills row a_m, tile columns a_k0 + A_STEP * i
  const int a_m = tid % BM_;
  const int a_k0 = tid / BM_;
  const int a_b = s_sample[a_m];
  const bool a_row_ok = a_b >= 0;
  int ih0 = 0, iw0 = 0;
  const float* x_b = x;
  if (a_row_ok) {
    const int pix = s_pix[a_m];
    const int oh = pix / Wo, ow = pix - (pix / Wo) * Wo;
    ih0 = oh * sh - ph;
    iw0 = ow * sw - pw;
    x_b = x + static_cast<int64_t>(a_b) * Kin * H * W;
  }
  const int64_t HW = static_cast<int64_t>(H) * W;
  // W loads: thread tid fills row b_k, tile columns b_n0 + (NT / BK) * i
  const int b_k = tid % BK;
  const int b_n0 = tid / BK;
  const int64_t w_row = static_cast<int64_t>(Cin) * KK;
  const int* in_row = in_idx + static_cast<int64_t>(rep) * Kin;

  // Reduction length: empty when no column of this tile is an active output channel.
  const int k_total = (n0 < nout) ? nin * KK : 0;

  float a_reg[A_PER];
  float b_reg[B_PER];
  // the global loads of the tile at k0 into registers
  auto load_tile = [&](int k0) {
    int k = k0 + a_k0;
    int j = k / KK;
    int rs = k - j * KK;
    int r = rs / kw;
    int s = rs - r * kw;
#pragma unroll
    for (int i = 0; i < A_PER; ++i) {
      float v = 0.f;
      if (a_row_ok && k < k_total) {
        const int ih = ih0 + r * dh;
        const int iw = iw0 + s * dw;
        if (ih >= 0 && ih < H && iw >= 0 && iw < W) v = x_b[j * HW + static_cast<int64_t>(ih) * W + iw];
      }
      a_reg[i] = v;
#pragma unroll
      for (int t = 0; t < A_STEP; ++t) {  // (j, r, s) of k + A_STEP, no division
        k += 1;
        if (++s == kw) {
          s = 0;
          if (++r == kh) {
            r = 0;
            ++j;
          }
        }
      }
    }
    const int kb = k0 + b_k;
    const bool k_ok = kb < k_total;
    int64_t w_k = 0;
    if (k_ok) {
      const int jb = kb / KK;
      w_k = static_cast<int64_t>(in_row[jb]) * KK + (kb - jb * KK);  // jb < nin <= Kin: a valid channel
    }
#pragma unroll
    for (int i = 0; i < B_PER; ++i) {
      const int oc = s_oc[b_n0 + (NT / BK) * i];
      b_reg[i] = (k_ok && oc >= 0) ? w[static_cast<int64_t>(oc) * w_row + w_k] : 0.f;
    }
  };
  auto store_tile = [&]() {
#pragma unroll
    for (int i = 0; i < A_PER; ++i) As[a_k0 + A_STEP * i][a_m] = a_reg[i];
#pragma unroll
    for (int i = 0; i < B_PER; ++i) Bs[b_k][b_n0 + (NT / BK) * i] = b_reg[i];
  };

  // rows ty * 4 .. + 4, columns tx * 4 .. + 4
  const int tx = tid % TX, ty = tid / TX;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) acc[i][jj] = 0.f;

  if (k_total > 0) {
    load_tile(0);
    store_tile();
  }
  __syncthreads();
  for (int k0 = 0; k0 < k_total; k0 += BK) {
    const bool more = k0 + BK < k_total;
    if (more) load_tile(k0 + BK);  // in flight during the FMAs below
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      const float4 a4 = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
      const float4 b4 = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
      const float a[4] = {a4.x, a4.y, a4.z, a4.w};
      const float bv[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) acc[i][jj] = fmaf(a[i], bv[jj], acc[i][jj]);
    }
    __syncthreads();  // every thread is done reading As / Bs
    if (more) store_tile();
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) Cs[tx * 4 + jj][ty * 4 + i] = acc[i][jj];
  __syncthreads();

  // ---- epilogue: bias + residual + ReLU, zeros for padding columns, store to the compact position
  for (int e = tid; e < BM_ * BN_; e += NT) {
    const int m = e % BM_;
    const int n = e / BM_;
    const int b = s_sample[m];
    const int col = n0 + n;
    if (b < 0 || col >= Kout) continue;
    const int64_t o_off = (static_cast<int64_t>(b) * Kout + col) * HoWo + s_pix[m];
    const int oc = s_oc[n];
    float v = 0.f;
    if (oc >= 0) {
      v = Cs[n][m];
      if (bias != nullptr) v += bias[oc];
      if (res != nullptr) v += res[o_off];
      if (relu) v = v < 0.f ? 0.f : v;  // NaN stays NaN, as torch.relu (fmaxf would drop it)
    }
    out[o_off] = v;
  }
}

// ---- any dtype, M <= kSmallM rows per group: one warp per (group, output column), lanes split K
constexpr int kSmallM = 8;
constexpr int kSmallCols = NT / 32;  // output columns per block (one per warp)

template <typename T>
__global__ void __launch_bounds__(NT) gathered_conv2d_small_m_kernel(
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias, const T* __restrict__ res,
    T* __restrict__ out, const int* __restrict__ in_idx, const int* __restrict__ out_idx,
    const int* __restrict__ n_in_arr, const int* __restrict__ n_out_arr, const int* __restrict__ samples,
    const int* __restrict__ gstart, const int* __restrict__ gcount, int Kin, int Kout, int H, int W, int Ho,
    int Wo, int Cin, int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw, bool relu) {
  const int g = blockIdx.x;
  const int lane = threadIdx.x % 32;
  const int n = blockIdx.y * kSmallCols + threadIdx.x / 32;
  if (n >= Kout) return;  // a whole warp (no block-wide synchronisation below)
  const int start = gstart[g];
  const int HoWo = Ho * Wo;
  const int M = gcount[g] * HoWo;  // <= kSmallM (the launch checks the largest group)
  const int rep = samples[start];
  const int nin = n_in_arr[rep];
  const int oc = (n < n_out_arr[rep]) ? out_idx[static_cast<int64_t>(rep) * Kout + n] : -1;
  const int64_t HW = static_cast<int64_t>(H) * W;

  int row_b[kSmallM], row_ih[kSmallM], row_iw[kSmallM];  // per row: its sample, its first tap
#pragma unroll
  for (int m = 0; m < kSmallM; ++m) {
    const int mm = m < M ? m : 0;
    const int pix = mm % HoWo;
    row_b[m] = samples[start + mm / HoWo];
    row_ih[m] = (pix / Wo) * sh - ph;
    row_iw[m] = (pix % Wo) * sw - pw;
  }
  float acc[kSmallM];
#pragma unroll
  for (int m = 0; m < kSmallM; ++m) acc[m] = 0.f;
  if (oc >= 0) {
    const int KK = kh * kw;
    const int K = nin * KK;
    const T* w_oc = w + static_cast<int64_t>(oc) * Cin * KK;
    const int* in_row = in_idx + static_cast<int64_t>(rep) * Kin;
    for (int k = lane; k < K; k += 32) {
      const int j = k / KK;
      const int rs = k - j * KK;
      const int r = rs / kw;
      const int s = rs - r * kw;
      const float wv = to_f32(w_oc[static_cast<int64_t>(in_row[j]) * KK + rs]);
#pragma unroll
      for (int m = 0; m < kSmallM; ++m) {
        if (m < M) {
          const int ih = row_ih[m] + r * dh;
          const int iw = row_iw[m] + s * dw;
          if (ih >= 0 && ih < H && iw >= 0 && iw < W) {
            const int64_t xi = (static_cast<int64_t>(row_b[m]) * Kin + j) * HW + static_cast<int64_t>(ih) * W + iw;
            acc[m] = fmaf(wv, to_f32(x[xi]), acc[m]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kSmallM; ++m)
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc[m] += __shfl_down_sync(0xffffffffu, acc[m], off);
  if (lane != 0) return;
#pragma unroll
  for (int m = 0; m < kSmallM; ++m) {
    if (m >= M) break;
    const int64_t o_off = (static_cast<int64_t>(row_b[m]) * Kout + n) * HoWo + m % HoWo;
    float v = 0.f;
    if (oc >= 0) {
      v = acc[m];
      if (bias != nullptr) v += to_f32(bias[oc]);
      if (res != nullptr) v += to_f32(res[o_off]);
      if (relu) v = v < 0.f ? 0.f : v;
    }
    out[o_off] = from_f32<T>(v);
  }
}

// The kernel for the shape and dtype (see the top of this file), one launch.
template <typename S>
void launch(const GatheredConvParams& p, at::Tensor& out, const at::Tensor& n_in, const at::Tensor& n_out,
            const at::Tensor& samples, const at::Tensor& gstart, const at::Tensor& gcount, int64_t ngroups,
            int64_t max_cnt) {
  using T = typename DeviceType<S>::type;
  auto ptr = [](const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr<S>()); };
  const T* bias_p = p.bias.defined() ? ptr(p.bias) : nullptr;
  const T* res_p = p.residual.defined() ? ptr(p.residual) : nullptr;
  auto i32 = [](int64_t v) { return static_cast<int>(v); };
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto go = [&](auto kernel, dim3 grid) {
    kernel<<<grid, NT, 0, stream>>>(
        ptr(p.x), ptr(p.weight), bias_p, res_p, reinterpret_cast<T*>(out.data_ptr<S>()), p.in_idx.data_ptr<int>(),
        p.out_idx.data_ptr<int>(), n_in.data_ptr<int>(), n_out.data_ptr<int>(), samples.data_ptr<int>(),
        gstart.data_ptr<int>(), gcount.data_ptr<int>(), i32(p.Kin), i32(p.Kout), i32(p.H), i32(p.W), i32(p.Ho),
        i32(p.Wo), i32(p.Cin), i32(p.kh), i32(p.kw), i32(p.sh), i32(p.sw), i32(p.ph), i32(p.pw), i32(p.dh),
        i32(p.dw), p.relu);
  };
  const int64_t m_rows = max_cnt * p.Ho * p.Wo;  // GEMM rows of the largest group
  auto tiles = [&](int64_t bm, int64_t bn) {
    const int64_t m_tiles = (m_rows + bm - 1) / bm, n_tiles = (p.Kout + bn - 1) / bn;
    TORCH_CHECK(m_tiles < INT32_MAX && n_tiles <= 65535 && ngroups <= 65535,
                "gathered_conv2d (CUDA): problem too large for one launch (", m_tiles, " x ", n_tiles, " x ",
                ngroups, " tiles)");
    return dim3(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles), static_cast<unsigned>(ngroups));
  };
  if (m_rows <= kSmallM) {
    const int64_t n_tiles = (p.Kout + kSmallCols - 1) / kSmallCols;
    TORCH_CHECK(ngroups < INT32_MAX && n_tiles <= 65535, "gathered_conv2d (CUDA): problem too large for one launch (",
                ngroups, " groups x ", n_tiles, " column tiles)");
    go(gathered_conv2d_small_m_kernel<T>, dim3(static_cast<unsigned>(ngroups), static_cast<unsigned>(n_tiles)));
  } else if constexpr (std::is_same<S, float>::value) {
    if (p.Kout <= 16) {
      go(gathered_conv2d_f32_kernel<16>, tiles(256, 16));
    } else if (p.Kout <= 32) {
      go(gathered_conv2d_f32_kernel<32>, tiles(128, 32));
    } else {
      go(gathered_conv2d_f32_kernel<64>, tiles(64, 64));
    }
  } else {
    go(gathered_conv2d_kernel<T, true>, tiles(BM, BN));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor gathered_conv2d_cuda(const at::Tensor& x, const at::Tensor& in_idx, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, const at::Tensor& out_idx,
                                const at::Tensor& sample_group, const c10::optional<at::Tensor>& residual,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                bool relu, const c10::optional<at::Tensor>& problems, int64_t max_group,
                                bool check_indices, const c10::optional<at::Tensor>& residual_take) {
  static const at::ScalarType kDtypes[] = {at::kFloat, at::kHalf, at::kBFloat16};
  const c10::cuda::CUDAGuard guard(x.device());
  // residual_take: the residual is re-compacted by the shared check (ATen ops), not read in place
  const GatheredConvParams p = gathered_conv_params(x, in_idx, weight, bias, out_idx, sample_group, residual, stride,
                                                    padding, dilation, relu, problems, max_group, check_indices,
                                                    residual_take, /*fuse_residual_take=*/false, kDtypes,
                                                    c10::DeviceType::CUDA);
  // 32-bit index arithmetic inside one sample; per-sample offsets are 64-bit.
  TORCH_CHECK(p.Kin * p.H * p.W < INT32_MAX && p.Cin * p.kh * p.kw < INT32_MAX && p.Kout * p.Ho * p.Wo < INT32_MAX,
              "gathered_conv2d (CUDA): a single sample is too large for the kernel's 32-bit indexing");
  auto out = at::empty({p.B, p.Kout, p.Ho, p.Wo}, p.x.options());
  if (p.empty_output()) return out;

  // Grouped problem list: planned on the host by the caller (no synchronisation here), or computed from
  // sample_group (unique + max: two synchronisations).
  at::Tensor samples, gcount, gstart;
  int64_t ngroups = p.ngroups, max_cnt = p.max_group;
  if (ngroups >= 0) {
    samples = p.problems.slice(0, 0, p.B);
    gstart = p.problems.slice(0, p.B, p.B + ngroups);
    gcount = p.problems.slice(0, p.B + ngroups, p.B + 2 * ngroups);
  } else {
    at::Tensor uniq, inverse, counts;
    std::tie(uniq, inverse, counts) = at::_unique2(p.sample_group, /*sorted=*/true, /*return_inverse=*/true,
                                                   /*return_counts=*/true);
    samples = std::get<1>(at::sort(inverse.reshape({-1}), /*stable=*/true, 0, false)).to(at::kInt);
    gcount = counts.to(at::kInt);
    gstart = (at::cumsum(counts, 0) - counts).to(at::kInt);
    ngroups = counts.numel();
    max_cnt = counts.max().item<int64_t>();
  }
  const at::Tensor n_in = p.in_idx.ge(0).sum({1}, false, at::kInt);
  const at::Tensor n_out = p.out_idx.ge(0).sum({1}, false, at::kInt);

  switch (p.x.scalar_type()) {
    case at::kFloat:
      launch<float>(p, out, n_in, n_out, samples, gstart, gcount, ngroups, max_cnt);
      break;
    case at::kHalf:
      launch<at::Half>(p, out, n_in, n_out, samples, gstart, gcount, ngroups, max_cnt);
      break;
    default:
      launch<at::BFloat16>(p, out, n_in, n_out, samples, gstart, gcount, ngroups, max_cnt);
  }
  return out;
}

}  // namespace
}  // namespace gencnp_fast

TORCH_LIBRARY_IMPL(gencnp_fast, CUDA, m) { m.impl("gathered_conv2d", &gencnp_fast::gathered_conv2d_cuda); }
