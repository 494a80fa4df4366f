// C++ smoke test of gencnp_fast::gathered_conv2d through the dispatcher (no Python).
// Compares the op with at::conv2d on the same gathered weights. Exit code 0 on success.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <vector>

int main() {
  at::manual_seed(0);
  const int64_t B = 3, Cin = 6, Cout = 5, Kin = 4, Kout = 4, H = 7, W = 6;
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("gencnp_fast::gathered_conv2d", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                  const c10::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                                  at::IntArrayRef, bool, const c10::optional<at::Tensor>&, int64_t, bool,
                                  const c10::optional<at::Tensor>&)>();

  // sample 0 and 1 share a mask (group 0), sample 2 has its own (group 1); -1 pads the rows.
  const std::vector<std::vector<int32_t>> in_rows = {{0, 2, 5, -1}, {0, 2, 5, -1}, {1, 3, 4, 5}};
  const std::vector<std::vector<int32_t>> out_rows = {{1, 3, -1, -1}, {1, 3, -1, -1}, {0, 1, 2, 4}};
  auto in_idx = at::empty({B, Kin}, at::kInt);
  auto out_idx = at::empty({B, Kout}, at::kInt);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < Kin; ++j) in_idx[b][j] = in_rows[b][j];
    for (int64_t j = 0; j < Kout; ++j) out_idx[b][j] = out_rows[b][j];
  }
  auto sample_group = at::tensor({0, 0, 1}, at::kInt);
  auto x = at::randn({B, Kin, H, W}) * (in_idx >= 0).to(at::kFloat).view({B, Kin, 1, 1});
  auto weight = at::randn({Cout, Cin, 3, 3});
  auto bias = at::randn({Cout});
  auto residual = at::randn({B, Kout, H, W});

  auto out = op.call(x, in_idx, weight, bias, out_idx, sample_group, residual, {1, 1}, {1, 1}, {1, 1}, true,
                     c10::nullopt, -1, true, c10::nullopt);

  double max_err = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> ipos, ich, opos, och;
    for (int64_t j = 0; j < Kin; ++j)
      if (in_rows[b][j] >= 0) ipos.push_back(j), ich.push_back(in_rows[b][j]);
    for (int64_t j = 0; j < Kout; ++j)
      if (out_rows[b][j] >= 0) opos.push_back(j), och.push_back(out_rows[b][j]);
    auto w = weight.index_select(0, at::tensor(och)).index_select(1, at::tensor(ich));
    auto xb = x.slice(0, b, b + 1).index_select(1, at::tensor(ipos));
    auto ref = at::conv2d(xb, w, bias.index_select(0, at::tensor(och)), {1, 1}, {1, 1}, {1, 1});
    ref = at::relu(ref + residual.slice(0, b, b + 1).index_select(1, at::tensor(opos)));
    auto got = out.slice(0, b, b + 1).index_select(1, at::tensor(opos));
    max_err = std::max(max_err, (got - ref).abs().max().item<double>());
    for (int64_t j = 0; j < Kout; ++j) {
      if (out_rows[b][j] < 0 && out[b][j].abs().max().item<double>() != 0.0) {
        std::fprintf(stderr, "FAIL: padded output row (%lld, %lld) is not zero\n", (long long)b, (long long)j);
        return 1;
      }
    }
  }
  std::printf("gathered_conv2d vs at::conv2d: max abs err %.3g\n", max_err);
  if (!(max_err < 1e-4)) {
    std::fprintf(stderr, "FAIL: error too large\n");
    return 1;
  }
  std::printf("OK\n");
  return 0;
}
