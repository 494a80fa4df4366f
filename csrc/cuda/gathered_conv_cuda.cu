// CUDA kernel of gencnp_fast::gathered_conv2d (schema in csrc/ops.cpp).
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
// Tile: BM = 64 pixels x BN = 64 output channels x BK = 16, 256 threads, float32 accumulation.
//   float16 / bfloat16: tensor cores through WMMA m16n16k16 (8 warps, each a 16 x 32 sub-tile), sm_80+.
//   float32: CUDA-core FMA (exact float32, no TF32), each thread a 4 x 4 sub-tile.
// Every global read is bounds-checked; shared memory holds A as [BK][BM], W as [BK][BN] and the result as
// [BN][BM] (float), so the epilogue writes consecutive output pixels from consecutive threads.
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

template <typename S>
void launch(const GatheredConvParams& p, at::Tensor& out, const at::Tensor& n_in, const at::Tensor& n_out,
            const at::Tensor& samples, const at::Tensor& gstart, const at::Tensor& gcount, dim3 grid) {
  using T = typename DeviceType<S>::type;
  constexpr bool kHalf = !std::is_same<S, float>::value;
  auto ptr = [](const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr<S>()); };
  const T* bias_p = p.bias.defined() ? ptr(p.bias) : nullptr;
  const T* res_p = p.residual.defined() ? ptr(p.residual) : nullptr;
  auto i32 = [](int64_t v) { return static_cast<int>(v); };
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  gathered_conv2d_kernel<T, kHalf><<<grid, NT, 0, stream>>>(
      ptr(p.x), ptr(p.weight), bias_p, res_p, reinterpret_cast<T*>(out.data_ptr<S>()), p.in_idx.data_ptr<int>(),
      p.out_idx.data_ptr<int>(), n_in.data_ptr<int>(), n_out.data_ptr<int>(), samples.data_ptr<int>(),
      gstart.data_ptr<int>(), gcount.data_ptr<int>(), i32(p.Kin), i32(p.Kout), i32(p.H), i32(p.W), i32(p.Ho),
      i32(p.Wo), i32(p.Cin), i32(p.kh), i32(p.kw), i32(p.sh), i32(p.sw), i32(p.ph), i32(p.pw), i32(p.dh), i32(p.dw),
      p.relu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor gathered_conv2d_cuda(const at::Tensor& x, const at::Tensor& in_idx, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, const at::Tensor& out_idx,
                                const at::Tensor& sample_group, const c10::optional<at::Tensor>& residual,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                bool relu, const c10::optional<at::Tensor>& problems, int64_t max_group,
                                bool check_indices) {
  static const at::ScalarType kDtypes[] = {at::kFloat, at::kHalf, at::kBFloat16};
  const c10::cuda::CUDAGuard guard(x.device());
  const GatheredConvParams p = gathered_conv_params(x, in_idx, weight, bias, out_idx, sample_group, residual, stride,
                                                    padding, dilation, relu, problems, max_group, check_indices, kDtypes,
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

  const int64_t m_tiles = (max_cnt * p.Ho * p.Wo + BM - 1) / BM;
  const int64_t n_tiles = (p.Kout + BN - 1) / BN;
  TORCH_CHECK(m_tiles < INT32_MAX && n_tiles <= 65535 && ngroups <= 65535,
              "gathered_conv2d (CUDA): problem too large for one launch (", m_tiles, " x ", n_tiles, " x ",
              ngroups, " tiles)");
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles), static_cast<unsigned>(ngroups));
  switch (p.x.scalar_type()) {
    case at::kFloat:
      launch<float>(p, out, n_in, n_out, samples, gstart, gcount, grid);
      break;
    case at::kHalf:
      launch<at::Half>(p, out, n_in, n_out, samples, gstart, gcount, grid);
      break;
    default:
      launch<at::BFloat16>(p, out, n_in, n_out, samples, gstart, gcount, grid);
  }
  return out;
}

}  // namespace
}  // namespace gencnp_fast

TORCH_LIBRARY_IMPL(gencnp_fast, CUDA, m) { m.impl("gathered_conv2d", &gencnp_fast::gathered_conv2d_cuda); }
