// gencnp_fast::gather_channels (schema in csrc/ops.cpp) for every device but the CPU (which has its own kernel,
// csrc/cpu/gather_channels_cpu.cpp), with ATen ops: one gather over dim 1 (index_select for one row, advanced
// indexing per sample), then the absent channels zeroed. Registered as CompositeExplicitAutograd, so a CUDA build
// needs no kernel of its own. Index values are checked with a device-side assert (no synchronisation on a GPU;
// reported at the next one).
#include "gather_channels.h"

#include <torch/library.h>

#include <vector>

namespace gencnp_fast {

at::Tensor gather_channels_aten(const at::Tensor& x, const at::Tensor& take,
                                const c10::optional<at::Tensor>& keep) {
  TORCH_CHECK(take.device() == x.device(), "gather_channels: take is on ", take.device(), ", x on ", x.device());
  TORCH_CHECK(x.dim() >= 2, "gather_channels: x must be [B, K, ...], got shape ", x.sizes());
  TORCH_CHECK(take.scalar_type() == at::kLong && take.dim() == 2, "gather_channels: take must be int64 [R, W]");
  const int64_t B = x.size(0), K = x.size(1), R = take.size(0);
  TORCH_CHECK(R == 1 || R == B, "gather_channels: take has ", R, " rows, x has a batch of ", B);
  const bool has_keep = keep.has_value() && keep->defined();
  if (has_keep) {
    TORCH_CHECK(keep->device() == x.device() && keep->scalar_type() == at::kByte && keep->sizes() == take.sizes(),
                "gather_channels: keep must be uint8 shaped like take");
  }
  if (take.numel() > 0) {
    at::Tensor ok = take.ge(0).logical_and(take.lt(K));
    if (has_keep) ok = ok.logical_or(keep->eq(0));
    at::_assert_async(ok.all(), "gather_channels: a kept take value is out of range [0, K)");
  }
  if (K == 0) {  // nothing stored: every entry must be absent (asserted above)
    std::vector<int64_t> shape = x.sizes().vec();
    shape[1] = take.size(1);
    return at::zeros(shape, x.options());
  }
  const at::Tensor safe = take.clamp(0, K - 1);
  at::Tensor out;
  if (R == 1) {
    out = x.index_select(1, safe[0]);
  } else {
    c10::List<c10::optional<at::Tensor>> index;
    index.push_back(at::arange(B, take.options()).unsqueeze(1));
    index.push_back(safe);
    out = at::index(x, index);
  }
  if (has_keep) {
    std::vector<int64_t> shape = {R, take.size(1)};
    for (int64_t d = 2; d < x.dim(); ++d) shape.push_back(1);
    out.masked_fill_(keep->eq(0).view(shape), 0);
  }
  return out.contiguous();
}

TORCH_LIBRARY_IMPL(gencnp_fast, CompositeExplicitAutograd, m) { m.impl("gather_channels", &gather_channels_aten); }

}  // namespace gencnp_fast
