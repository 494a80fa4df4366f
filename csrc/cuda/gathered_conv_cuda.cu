// CUDA kernel of gencnp_fast::gathered_conv2d (schema in csrc/ops.cpp).
//
//   out[b, j] = act(bias[o] + sum_{j' < n_in(b)} conv(x[b, j'], weight[o, in_idx[b, j']]) + residual[b, j])
//   o = out_idx[b, j];  out[b, j] = 0 exactly where out_idx[b, j] == -1
//
// Implicit GEMM over a grouped problem list, one launch for the whole batch (the same mapping as the Triton
// kernel in gencnp_fast/kernels/triton_conv.py):
//   * one problem per group of samples sharing a mask (`groups`); problem g is
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

#include "../problems.h"

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
      if (relu) v = fmaxf(v, 0.f);
    }
    out[o_off] = from_f32<T>(v);
  }
}

std::vector<int64_t> pair_param(at::IntArrayRef v, const char* name) {
  TORCH_CHECK(v.size() == 1 || v.size() == 2, "gathered_conv2d: ", name, " must have 1 or 2 values, got ",
              v.size());
  return v.size() == 1 ? std::vector<int64_t>{v[0], v[0]} : std::vector<int64_t>{v[0], v[1]};
}

template <typename S>
void launch(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
            const c10::optional<at::Tensor>& res, at::Tensor& out, const at::Tensor& in_idx,
            const at::Tensor& out_idx, const at::Tensor& n_in, const at::Tensor& n_out, const at::Tensor& samples,
            const at::Tensor& gstart, const at::Tensor& gcount, dim3 grid, int Kin, int Kout, int H, int W, int Ho,
            int Wo, int Cin, int kh, int kw, const std::vector<int64_t>& st, const std::vector<int64_t>& pd,
            const std::vector<int64_t>& dl, bool relu) {
  using T = typename DeviceType<S>::type;
  constexpr bool kHalf = !std::is_same<S, float>::value;
  auto ptr = [](const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr<S>()); };
  const T* bias_p = bias.has_value() ? ptr(*bias) : nullptr;
  const T* res_p = res.has_value() ? ptr(*res) : nullptr;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  gathered_conv2d_kernel<T, kHalf><<<grid, NT, 0, stream>>>(
      ptr(x), ptr(w), bias_p, res_p, reinterpret_cast<T*>(out.data_ptr<S>()), in_idx.data_ptr<int>(),
      out_idx.data_ptr<int>(), n_in.data_ptr<int>(), n_out.data_ptr<int>(), samples.data_ptr<int>(),
      gstart.data_ptr<int>(), gcount.data_ptr<int>(), Kin, Kout, H, W, Ho, Wo, Cin, kh, kw,
      static_cast<int>(st[0]), static_cast<int>(st[1]), static_cast<int>(pd[0]), static_cast<int>(pd[1]),
      static_cast<int>(dl[0]), static_cast<int>(dl[1]), relu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor gathered_conv2d_cuda(const at::Tensor& x_in, const at::Tensor& in_idx_in, const at::Tensor& weight_in,
                                const c10::optional<at::Tensor>& bias_in, const at::Tensor& out_idx_in,
                                const at::Tensor& groups_in, const c10::optional<at::Tensor>& residual_in,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                bool relu, const c10::optional<at::Tensor>& problems, int64_t max_group) {
  TORCH_CHECK(x_in.dim() == 4, "gathered_conv2d: x must be [B, Kin, H, W], got ", x_in.sizes());
  TORCH_CHECK(weight_in.dim() == 4, "gathered_conv2d: weight must be [C_out, C_in, kh, kw], got ",
              weight_in.sizes());
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "gathered_conv2d (CUDA): x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(weight_in.scalar_type() == dtype, "gathered_conv2d: weight is ", weight_in.scalar_type(),
              ", x is ", dtype);
  TORCH_CHECK(in_idx_in.scalar_type() == at::kInt, "gathered_conv2d: in_idx must be int32");
  TORCH_CHECK(out_idx_in.scalar_type() == at::kInt, "gathered_conv2d: out_idx must be int32");
  TORCH_CHECK(groups_in.scalar_type() == at::kInt, "gathered_conv2d: groups must be int32");
  const auto dev = x_in.device();
  TORCH_CHECK(dev.is_cuda(), "gathered_conv2d (CUDA): x must be a CUDA tensor");
  for (const at::Tensor* t : {&in_idx_in, &weight_in, &out_idx_in, &groups_in}) {
    TORCH_CHECK(t->device() == dev, "gathered_conv2d: all tensors must be on ", dev, ", got one on ", t->device());
  }
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->device() == dev, "gathered_conv2d: bias must be on ", dev);
    TORCH_CHECK(bias_in->scalar_type() == dtype, "gathered_conv2d: bias is ", bias_in->scalar_type(),
                ", x is ", dtype);
  }
  if (residual_in.has_value()) {
    TORCH_CHECK(residual_in->device() == dev, "gathered_conv2d: residual must be on ", dev);
    TORCH_CHECK(residual_in->scalar_type() == dtype, "gathered_conv2d: residual is ",
                residual_in->scalar_type(), ", x is ", dtype);
  }
  const c10::cuda::CUDAGuard guard(dev);

  const auto st = pair_param(stride, "stride");
  const auto pd = pair_param(padding, "padding");
  const auto dl = pair_param(dilation, "dilation");
  TORCH_CHECK(st[0] >= 1 && st[1] >= 1 && dl[0] >= 1 && dl[1] >= 1 && pd[0] >= 0 && pd[1] >= 0,
              "gathered_conv2d: stride and dilation must be >= 1, padding >= 0");

  const int64_t B = x_in.size(0), Kin = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t Cout = weight_in.size(0), Cin = weight_in.size(1), kh = weight_in.size(2), kw = weight_in.size(3);
  TORCH_CHECK(in_idx_in.dim() == 2 && in_idx_in.size(0) == B && in_idx_in.size(1) == Kin,
              "gathered_conv2d: in_idx must be [B, Kin] = [", B, ", ", Kin, "], got ", in_idx_in.sizes());
  TORCH_CHECK(out_idx_in.dim() == 2 && out_idx_in.size(0) == B, "gathered_conv2d: out_idx must be [B, Kout], got ",
              out_idx_in.sizes());
  TORCH_CHECK(groups_in.dim() == 1 && groups_in.size(0) == B, "gathered_conv2d: groups must be [B], got ",
              groups_in.sizes());
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == Cout, "gathered_conv2d: bias must be [C_out] = [",
                Cout, "], got ", bias_in->sizes());
  }
  const int64_t Kout = out_idx_in.size(1);
  const int64_t Ho = (H + 2 * pd[0] - dl[0] * (kh - 1) - 1) / st[0] + 1;
  const int64_t Wo = (W + 2 * pd[1] - dl[1] * (kw - 1) - 1) / st[1] + 1;
  TORCH_CHECK(H + 2 * pd[0] - dl[0] * (kh - 1) - 1 >= 0 && W + 2 * pd[1] - dl[1] * (kw - 1) - 1 >= 0,
              "gathered_conv2d: the kernel (with dilation) is larger than the padded input");
  if (residual_in.has_value()) {
    TORCH_CHECK(residual_in->dim() == 4 && residual_in->size(0) == B && residual_in->size(1) == Kout &&
                    residual_in->size(2) == Ho && residual_in->size(3) == Wo,
                "gathered_conv2d: residual must be [", B, ", ", Kout, ", ", Ho, ", ", Wo, "], got ",
                residual_in->sizes());
  }
  // 32-bit index arithmetic inside one sample; per-sample offsets are 64-bit.
  TORCH_CHECK(Kin * H * W < INT32_MAX && Cin * kh * kw < INT32_MAX && Kout * Ho * Wo < INT32_MAX,
              "gathered_conv2d (CUDA): a single sample is too large for the kernel's 32-bit indexing");

  auto out = at::empty({B, Kout, Ho, Wo}, x_in.options());
  if (B == 0 || Kout == 0) return out;

  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor in_idx = in_idx_in.contiguous();
  const at::Tensor out_idx = out_idx_in.contiguous();
  c10::optional<at::Tensor> bias, residual;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  if (residual_in.has_value()) residual = residual_in->contiguous();

  // Grouped problem list: samples sorted by group, start and size of each group. Planned on the host by the
  // caller (no synchronisation here), or computed from `groups` (unique + max: two synchronisations).
  at::Tensor samples, gcount, gstart;
  int64_t ngroups, max_cnt;
  const int64_t G = check_problems(problems, max_group, B, dev);
  if (G >= 0) {
    const at::Tensor p = problems->contiguous();
    samples = p.slice(0, 0, B);
    gstart = p.slice(0, B, B + G);
    gcount = p.slice(0, B + G, B + 2 * G);
    ngroups = G;
    max_cnt = max_group;
  } else {
    at::Tensor uniq, inverse, counts;
    std::tie(uniq, inverse, counts) = at::_unique2(groups_in, /*sorted=*/true, /*return_inverse=*/true,
                                                   /*return_counts=*/true);
    samples = std::get<1>(at::sort(inverse.reshape({-1}), /*stable=*/true, 0, false)).to(at::kInt);
    gcount = counts.to(at::kInt);
    gstart = (at::cumsum(counts, 0) - counts).to(at::kInt);
    ngroups = counts.numel();
    max_cnt = counts.max().item<int64_t>();
  }
  const at::Tensor n_in = in_idx.ge(0).sum({1}, false, at::kInt);
  const at::Tensor n_out = out_idx.ge(0).sum({1}, false, at::kInt);

  const int64_t m_tiles = (max_cnt * Ho * Wo + BM - 1) / BM;
  const int64_t n_tiles = (Kout + BN - 1) / BN;
  TORCH_CHECK(m_tiles < INT32_MAX && n_tiles <= 65535 && ngroups <= 65535,
              "gathered_conv2d (CUDA): problem too large for one launch (", m_tiles, " x ", n_tiles, " x ",
              ngroups, " tiles)");
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles), static_cast<unsigned>(ngroups));

#define GENCNP_LAUNCH(S)                                                                                        \
  launch<S>(x, weight, bias, residual, out, in_idx, out_idx, n_in, n_out, samples, gstart, gcount, grid,        \
            static_cast<int>(Kin), static_cast<int>(Kout), static_cast<int>(H), static_cast<int>(W),            \
            static_cast<int>(Ho), static_cast<int>(Wo), static_cast<int>(Cin), static_cast<int>(kh),            \
            static_cast<int>(kw), st, pd, dl, relu)
  if (dtype == at::kFloat) {
    GENCNP_LAUNCH(float);
  } else if (dtype == at::kHalf) {
    GENCNP_LAUNCH(at::Half);
  } else {
    GENCNP_LAUNCH(at::BFloat16);
  }
#undef GENCNP_LAUNCH
  return out;
}

}  // namespace
}  // namespace gencnp_fast

TORCH_LIBRARY_IMPL(gencnp_fast, CUDA, m) { m.impl("gathered_conv2d", &gencnp_fast::gathered_conv2d_cuda); }
