// The one argument check of gencnp_fast::gathered_conv2d (see gathered_conv_params.h).
#include "gathered_conv_params.h"

#include "common.h"
#include "gather_channels.h"

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

namespace gencnp_fast {
namespace {

constexpr const char* kOp = "gathered_conv2d: ";

void check_tensor(const at::Tensor& t, const char* name, const at::Device& device, int64_t dim) {
  TORCH_CHECK(t.defined(), kOp, name, " is undefined");
  TORCH_CHECK(t.device() == device, kOp, name, " is on ", t.device(), ", x is on ", device);
  TORCH_CHECK(t.dim() == dim, kOp, name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

void check_float(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, kOp, name, " must be ", dtype, " like x, got ", t.scalar_type());
}

void check_int32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt, kOp, name, " must be int32, got ", t.scalar_type());
}

// Every row of an int32 index tensor: entries in [-1, limit), the valid ones strictly increasing and first, then
// -1 padding (the GPU kernels read positions j < count as valid).
void check_index_rows(const at::Tensor& idx, int64_t limit, const char* name) {
  const int32_t* p = idx.data_ptr<int32_t>();
  const int64_t rows = idx.size(0), cols = idx.size(1);
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* row = p + r * cols;
    for (int64_t j = 0; j < cols; ++j) {
      TORCH_CHECK(row[j] >= -1 && row[j] < limit, kOp, name, "[", r, ", ", j, "] = ", row[j],
                  " is out of range [-1, ", limit, ")");
      TORCH_CHECK(j == 0 || row[j] == -1 || (row[j - 1] >= 0 && row[j] > row[j - 1]), kOp, name, "[", r, ", ", j,
                  "] = ", row[j], " after ", row[j - 1], ": a row's valid entries must be strictly increasing and "
                  "come before its -1 padding");
    }
  }
}

// The problem list of sample_group on the host: samples stably sorted by group id, then starts and sizes.
at::Tensor host_problems(const at::Tensor& sample_group, int64_t& ngroups, int64_t& max_group) {
  const int64_t B = sample_group.numel();
  const int32_t* g = sample_group.data_ptr<int32_t>();
  std::vector<int32_t> order(static_cast<size_t>(B));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [g](int32_t a, int32_t b) { return g[a] < g[b]; });
  std::vector<int32_t> starts, sizes;
  for (int64_t s = 0; s < B; ++s) {
    if (s == 0 || g[order[s]] != g[order[s - 1]]) {
      starts.push_back(static_cast<int32_t>(s));
      sizes.push_back(0);
    }
    ++sizes.back();
  }
  ngroups = static_cast<int64_t>(sizes.size());
  max_group = sizes.empty() ? -1 : *std::max_element(sizes.begin(), sizes.end());
  at::Tensor out = at::empty({B + 2 * ngroups}, sample_group.options());
  int32_t* o = out.data_ptr<int32_t>();
  std::copy(order.begin(), order.end(), o);
  std::copy(starts.begin(), starts.end(), o + B);
  std::copy(sizes.begin(), sizes.end(), o + B + ngroups);
  return out;
}

// The index values on a GPU: device-side asserts, no synchronisation (a bad value is reported at the next one).
void assert_indices_async(const GatheredConvParams& p) {
  auto in_range = [](const at::Tensor& t, int64_t lo, int64_t hi) { return t.ge(lo).logical_and(t.lt(hi)).all(); };
  // each adjacent pair (a, b) of a row: b is padding, or a is valid and b > a
  auto ordered = [](const at::Tensor& t) {
    if (t.size(1) < 2) return at::ones({}, t.options().dtype(at::kBool));
    const at::Tensor a = t.slice(1, 0, -1), b = t.slice(1, 1);
    return b.eq(-1).logical_or(a.ge(0).logical_and(b.gt(a))).all();
  };
  at::_assert_async(in_range(p.in_idx, -1, p.Cin).logical_and(ordered(p.in_idx)),
                    "gathered_conv2d: in_idx has a value out of range [-1, C_in) or a row not ascending then -1");
  at::_assert_async(in_range(p.out_idx, -1, p.Cout).logical_and(ordered(p.out_idx)),
                    "gathered_conv2d: out_idx has a value out of range [-1, C_out) or a row not ascending then -1");
  if (p.B > 1) {  // samples with one sample_group value have identical rows
    const at::Tensor order = std::get<1>(at::sort(p.sample_group, /*stable=*/true, 0, false));
    const at::Tensor g = p.sample_group.index_select(0, order);
    const at::Tensor in_rows = p.in_idx.index_select(0, order), out_rows = p.out_idx.index_select(0, order);
    const at::Tensor same = g.slice(0, 1).eq(g.slice(0, 0, -1));
    const at::Tensor rows_eq = in_rows.slice(0, 1).eq(in_rows.slice(0, 0, -1)).all(1).logical_and(
        out_rows.slice(0, 1).eq(out_rows.slice(0, 0, -1)).all(1));
    at::_assert_async(same.logical_not().logical_or(rows_eq).all(),
                      "gathered_conv2d: samples in one group (equal sample_group) have different in_idx/out_idx rows");
  }
  if (p.ngroups <= 0) return;
  const at::Tensor starts = p.problems.slice(0, p.B, p.B + p.ngroups);
  const at::Tensor sizes = p.problems.slice(0, p.B + p.ngroups, p.B + 2 * p.ngroups);
  at::_assert_async(in_range(p.problems.slice(0, 0, p.B), 0, p.B),
                    "gathered_conv2d: problems: a sample is out of range");
  {  // every sample once: a sample left out would leave its output rows unwritten
    const at::Tensor s = p.problems.slice(0, 0, p.B);
    const at::Tensor listed = at::zeros({p.B}, s.options()).index_add_(0, s.clamp(0, p.B - 1).to(at::kLong),
                                                                       at::ones_like(s));
    at::_assert_async(listed.eq(1).all(), "gathered_conv2d: problems: a sample is listed twice or not at all");
  }
  const at::Tensor ends = at::cumsum(sizes, 0);
  at::_assert_async(sizes.ge(1).logical_and(starts.eq(ends - sizes)).all().logical_and(ends[-1].eq(p.B))
                        .logical_and(sizes.max().eq(p.max_group)),
                    "gathered_conv2d: problems: the groups do not tile the batch, or max_group is not the largest");
  if (p.B > 1) {  // a problem's samples share one sample_group value
    const at::Tensor first = at::zeros({p.B}, p.problems.options().dtype(at::kBool))
                                 .index_fill_(0, starts.clamp(0, p.B - 1).to(at::kLong), true);
    const at::Tensor sg = p.sample_group.index_select(0, p.problems.slice(0, 0, p.B).clamp(0, p.B - 1).to(at::kLong));
    at::_assert_async(first.slice(0, 1).logical_or(sg.slice(0, 1).eq(sg.slice(0, 0, -1))).all(),
                      "gathered_conv2d: problems: a group mixes samples of different sample_group values");
  }
}

// A given problem list: [B + 2G] with B = 0 <=> G = 0 and 1 <= max_group <= B; on the host (check_values) also its
// values: the groups tile the sorted samples, every sample appears once, and samples of a group share one
// sample_group value that no other group has.
void check_problems(GatheredConvParams& p, const at::Tensor& problems, int64_t max_group, bool check_values) {
  check_tensor(problems, "problems", p.x.device(), 1);
  check_int32(problems, "problems");
  const int64_t n = problems.size(0), B = p.B;
  TORCH_CHECK(n >= B && (n - B) % 2 == 0, kOp, "problems must be [B + 2G] (samples, group starts, group sizes) ",
              "with B = ", B, ", got ", problems.sizes());
  const int64_t G = (n - B) / 2;
  TORCH_CHECK((B == 0) == (G == 0), kOp, "problems must list at least one group for B = ", B);
  TORCH_CHECK(G == 0 || (max_group >= 1 && max_group <= B), kOp, "max_group must be the largest group size (1..",
              B, "), got ", max_group);
  p.problems = problems.contiguous();
  p.ngroups = G;
  p.max_group = G == 0 ? -1 : max_group;
  if (!check_values || !p.x.device().is_cpu()) return;
  const int32_t* q = p.problems.data_ptr<int32_t>();
  const int32_t* gid = p.sample_group.data_ptr<int32_t>();
  std::vector<char> seen(static_cast<size_t>(B), 0);
  int64_t next = 0, largest = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t start = q[B + g], size = q[B + G + g];
    TORCH_CHECK(start == next && size >= 1 && start + size <= B, kOp, "problems: group ", g, " (start ", start,
                ", size ", size, ") does not follow the previous groups in a batch of ", B);
    for (int64_t s = start; s < start + size; ++s) {
      const int64_t b = q[s];
      TORCH_CHECK(b >= 0 && b < B && !seen[b], kOp, "problems: sample ", b, " is out of range or listed twice");
      seen[b] = 1;
      TORCH_CHECK(gid[b] == gid[q[start]], kOp, "problems: samples ", q[start], " and ", b, " share group ", g,
                  " but have different sample_group values");
      TORCH_CHECK(g == 0 || gid[b] != gid[q[q[B + g - 1]]], kOp, "problems: groups ", g - 1, " and ", g,
                  " have the same sample_group value");
    }
    next = start + size;
    largest = std::max(largest, size);
  }
  TORCH_CHECK(next == B, kOp, "problems: the groups cover ", next, " of ", B, " samples");
  TORCH_CHECK(G == 0 || largest == max_group, kOp, "max_group is ", max_group, ", the largest group has ", largest,
              " samples");
}

}  // namespace

GatheredConvParams gathered_conv_params(const at::Tensor& x, const at::Tensor& in_idx, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias, const at::Tensor& out_idx,
                                        const at::Tensor& sample_group, const c10::optional<at::Tensor>& residual,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        bool relu, const c10::optional<at::Tensor>& problems, int64_t max_group,
                                        bool check_indices, const c10::optional<at::Tensor>& residual_take,
                                        bool fuse_residual_take, c10::ArrayRef<at::ScalarType> dtypes,
                                        c10::DeviceType device_type) {
  TORCH_CHECK(x.defined() && x.device().type() == device_type, kOp, "x must be a ", device_type, " tensor here");
  const at::Device dev = x.device();
  const auto dtype = x.scalar_type();
  TORCH_CHECK(std::find(dtypes.begin(), dtypes.end(), dtype) != dtypes.end(), kOp, "x must be one of ", dtypes,
              " on ", device_type, ", got ", dtype);
  check_tensor(x, "x", dev, 4);
  check_tensor(weight, "weight", dev, 4);
  check_tensor(in_idx, "in_idx", dev, 2);
  check_tensor(out_idx, "out_idx", dev, 2);
  check_tensor(sample_group, "sample_group", dev, 1);
  check_float(weight, "weight", dtype);
  check_int32(in_idx, "in_idx");
  check_int32(out_idx, "out_idx");
  check_int32(sample_group, "sample_group");

  GatheredConvParams p;
  p.B = x.size(0), p.Kin = x.size(1), p.H = x.size(2), p.W = x.size(3);
  p.Cout = weight.size(0), p.Cin = weight.size(1), p.kh = weight.size(2), p.kw = weight.size(3);
  p.Kout = out_idx.size(1);
  p.relu = relu;
  TORCH_CHECK(in_idx.size(0) == p.B && in_idx.size(1) == p.Kin, kOp, "in_idx must be [B, Kin] = [", p.B, ", ", p.Kin,
              "], got ", in_idx.sizes());
  TORCH_CHECK(out_idx.size(0) == p.B, kOp, "out_idx must be [B, Kout] with B = ", p.B, ", got ", out_idx.sizes());
  TORCH_CHECK(sample_group.size(0) == p.B, kOp, "sample_group must be [B] = [", p.B, "], got ",
              sample_group.sizes());
  TORCH_CHECK(p.kh >= 1 && p.kw >= 1, kOp, "weight has an empty kernel ", weight.sizes());
  pair_arg(stride, kOp, "stride", 1, p.sh, p.sw);
  pair_arg(padding, kOp, "padding", 0, p.ph, p.pw);
  pair_arg(dilation, kOp, "dilation", 1, p.dh, p.dw);
  const int64_t span_h = p.H + 2 * p.ph - p.dh * (p.kh - 1) - 1, span_w = p.W + 2 * p.pw - p.dw * (p.kw - 1) - 1;
  TORCH_CHECK(span_h >= 0 && span_w >= 0, kOp, "input ", p.H, "x", p.W, " is smaller than the (dilated) kernel ",
              p.kh, "x", p.kw, " with padding ", padding);
  p.Ho = span_h / p.sh + 1;
  p.Wo = span_w / p.sw + 1;
  if (bias.has_value() && bias->defined()) {
    check_tensor(*bias, "bias", dev, 1);
    check_float(*bias, "bias", dtype);
    TORCH_CHECK(bias->size(0) == p.Cout, kOp, "bias must be [C_out] = [", p.Cout, "], got ", bias->sizes());
    p.bias = bias->contiguous();
  }
  const bool has_take = residual_take.has_value() && residual_take->defined();
  if (residual.has_value() && residual->defined()) {
    check_tensor(*residual, "residual", dev, 4);
    check_float(*residual, "residual", dtype);
    const int64_t Kres = has_take ? residual->size(1) : p.Kout;
    TORCH_CHECK(residual->size(0) == p.B && residual->size(1) == Kres && residual->size(2) == p.Ho &&
                    residual->size(3) == p.Wo,
                kOp, "residual must be [B, ", has_take ? "Kres" : "Kout", ", Ho, Wo] = [", p.B, ", ",
                has_take ? "any" : std::to_string(p.Kout), ", ", p.Ho, ", ", p.Wo, "], got ", residual->sizes());
    p.residual = residual->contiguous();
  }
  if (has_take) {
    TORCH_CHECK(p.residual.defined(), kOp, "residual_take is given without a residual");
    TORCH_CHECK(residual_take->device() == dev, kOp, "residual_take is on ", residual_take->device(), ", x is on ",
                dev);
    TORCH_CHECK(residual_take->scalar_type() == at::kLong, kOp, "residual_take must be int64, got ",
                residual_take->scalar_type());
    const bool per_sample = residual_take->dim() == 2;
    TORCH_CHECK((residual_take->dim() == 1 && residual_take->size(0) == p.Kout) ||
                    (per_sample && residual_take->size(0) == p.B && residual_take->size(1) == p.Kout),
                kOp, "residual_take must be [Kout] = [", p.Kout, "] or [B, Kout] = [", p.B, ", ", p.Kout, "], got ",
                residual_take->sizes());
    p.residual_take = residual_take->contiguous();
    const int64_t Kres = p.residual.size(1);
    if (check_indices && dev.is_cpu()) {
      const int64_t* t = p.residual_take.data_ptr<int64_t>();
      for (int64_t j = 0; j < p.residual_take.numel(); ++j) {
        TORCH_CHECK(t[j] >= -1 && t[j] < Kres, kOp, "residual_take holds ", t[j], " (flat entry ", j,
                    "), out of range [-1, ", Kres, ")");
      }
    } else if (check_indices && p.residual_take.numel() > 0) {
      at::_assert_async(p.residual_take.ge(-1).logical_and(p.residual_take.lt(Kres)).all(),
                        "gathered_conv2d: residual_take has a value out of range [-1, Kres)");
    }
    if (!fuse_residual_take) {  // re-compact here (gather_channels): [B, Kout, Ho, Wo], zeros where it is -1
      const at::Tensor rows = per_sample ? p.residual_take : p.residual_take.unsqueeze(0);
      p.residual = gather_channels_aten(p.residual, rows.clamp_min(0), rows.ge(0).to(at::kByte));
      p.residual_take = at::Tensor();
    }
  }
  p.x = x.contiguous();
  p.weight = weight.contiguous();
  p.in_idx = in_idx.contiguous();
  p.out_idx = out_idx.contiguous();
  p.sample_group = sample_group.contiguous();
  if (problems.has_value() && problems->defined()) {
    check_problems(p, *problems, max_group, check_indices);
  } else {
    TORCH_CHECK(max_group == -1, kOp, "max_group is given without problems");
    if (dev.is_cpu()) p.problems = host_problems(p.sample_group, p.ngroups, p.max_group);
  }
  if (check_indices && dev.is_cpu()) {
    check_index_rows(p.in_idx, p.Cin, "in_idx");
    check_index_rows(p.out_idx, p.Cout, "out_idx");
  } else if (check_indices && p.B > 0) {
    assert_indices_async(p);
  }
  return p;
}

}  // namespace gencnp_fast
