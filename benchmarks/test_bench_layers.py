"""Layer benchmark of torch.ops.gencnp_fast.gathered_conv2d vs the dense masked reference.

    pytest benchmarks/test_bench_layers.py --benchmark-only [-k "vgg_4 and d0.25"]
    pytest benchmarks/test_bench_layers.py --benchmark-only --benchmark-json=benchmarks/results/layers.json

Per layer shape (CIFAR VGG-16 3x3 layers at 32/16/8/4/2, the first layer, ResNet-18 1x1 stride-2
downsamples, the Linear head), density {1, 0.5, 0.25, 0.1}, batch {1, 16, 64}: one benchmark group
holding, side by side,
  * ``dense_masked``: F.conv2d on the full (masked) input, then bias + ReLU and the channel mask
    multiply -- what the dense masked model does per layer;
  * ``fast[shared|class|sample]``: the compacted op with one shared mask, 10 per-class masks, or one
    mask per sample.
``extra_info`` holds FLOPs, the ideal (FLOP-ratio) speedup, weight/activation bytes and the
bytes-based bound. Every benchmark checks the op against the plain-torch reference before timing.
Threads: torch's default (set ``OMP_NUM_THREADS``/``torch.set_num_threads`` to pin); reported in
``extra_info['threads']``.
"""
import pytest
import torch
import torch.nn.functional as F

ops = pytest.importorskip("gencnp_fast.ops")
from gencnp_fast.kernels.contract import gathered_conv2d_reference  # noqa: E402

# name: (C_in, C_out, H, k, stride, padding, relu, input_masked)
LAYERS = {
    "vgg_first_3to64_32": (3, 64, 32, 3, 1, 1, True, False),
    "vgg_64_32": (64, 64, 32, 3, 1, 1, True, True),
    "vgg_128_16": (128, 128, 16, 3, 1, 1, True, True),
    "vgg_256_8": (256, 256, 8, 3, 1, 1, True, True),
    "vgg_512_4": (512, 512, 4, 3, 1, 1, True, True),
    "vgg_512_2": (512, 512, 2, 3, 1, 1, True, True),
    "resnet_ds_64to128_32": (64, 128, 32, 1, 2, 0, False, True),
    "resnet_ds_128to256_16": (128, 256, 16, 1, 2, 0, False, True),
    "resnet_ds_256to512_8": (256, 512, 8, 1, 2, 0, False, True),
    "linear_512to10": (512, 10, 1, 1, 1, 0, False, True),
}
DENSITIES = [1.0, 0.5, 0.25, 0.1]
BATCHES = [1, 16, 64]
SHARINGS = ["shared", "class", "sample"]
IMPLS = ["dense_masked"] + ["fast[%s]" % s for s in SHARINGS]
N_CLASSES = 10

_cache = {}


def _problem(layer, density, batch, sharing):
    key = (layer, density, batch, sharing)
    if key in _cache:
        return _cache[key]
    C_in, C_out, H, k, stride, padding, relu, in_masked = LAYERS[layer]
    g = torch.Generator().manual_seed(hash(key) % (2**31))
    Kin = max(1, round(C_in * density)) if in_masked else C_in
    out_masked = layer != "linear_512to10"  # logits are never masked
    Kout = max(1, round(C_out * density)) if out_masked else C_out
    ngroups = {"shared": 1, "class": min(N_CLASSES, batch), "sample": batch}[sharing]
    sample_group = (torch.arange(batch) % ngroups).to(torch.int32)
    in_idx = torch.empty(batch, Kin, dtype=torch.int32)
    out_idx = torch.empty(batch, Kout, dtype=torch.int32)
    for gg in range(ngroups):
        sel = sample_group == gg
        in_idx[sel] = torch.randperm(C_in, generator=g)[:Kin].sort().values.to(torch.int32)
        out_idx[sel] = torch.randperm(C_out, generator=g)[:Kout].sort().values.to(torch.int32)
    weight = torch.randn(C_out, C_in, k, k, generator=g) / (C_in * k * k) ** 0.5
    bias = torch.randn(C_out, generator=g)
    x = torch.randn(batch, Kin, H, H, generator=g)
    # dense masked reference inputs
    in_mask = torch.zeros(batch, C_in)
    in_mask.scatter_(1, in_idx.long(), 1.0)
    out_mask = torch.zeros(batch, C_out)
    out_mask.scatter_(1, out_idx.long(), 1.0)
    x_dense = torch.zeros(batch, C_in, H, H)
    x_dense.scatter_(1, in_idx.long()[:, :, None, None].expand(batch, Kin, H, H), x)
    Ho = (H + 2 * padding - k) // stride + 1
    p = dict(x=x, in_idx=in_idx, weight=weight, bias=bias, out_idx=out_idx, sample_group=sample_group,
             residual=None, stride=stride, padding=padding, dilation=1, relu=relu, x_dense=x_dense,
             out_mask=out_mask[:, :, None, None].contiguous(), ngroups=ngroups, Ho=Ho, Kin=Kin, Kout=Kout)
    _cache.clear()  # keep memory bounded: only the current problem
    _cache[key] = p
    return p


def _info(layer, p, batch):
    C_in, C_out, H, k, stride, padding, relu, _ = LAYERS[layer]
    P = p["Ho"] * p["Ho"]
    dense_flops = 2 * batch * C_out * C_in * k * k * P
    fast_flops = 2 * batch * p["Kout"] * p["Kin"] * k * k * P
    dense_bytes = 4 * (C_out * C_in * k * k + batch * (C_in * H * H + 2 * C_out * P))
    fast_bytes = 4 * (p["ngroups"] * p["Kout"] * p["Kin"] * k * k + batch * (p["Kin"] * H * H + p["Kout"] * P))
    return dict(threads=torch.get_num_threads(), dense_flops=dense_flops, fast_flops=fast_flops,
                ideal_speedup_flops=dense_flops / fast_flops, dense_bytes=dense_bytes, fast_bytes=fast_bytes,
                ideal_speedup_bytes=dense_bytes / fast_bytes, ngroups=p["ngroups"], Kin=p["Kin"], Kout=p["Kout"])


def _rounds(fn):
    import time

    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return int(min(30, max(3, 0.25 / max(dt, 1e-6))))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: "d%s" % d)
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("impl", IMPLS)
def test_layer(benchmark, impl, layer, density, batch):
    sharing = impl[5:-1] if impl.startswith("fast") else "sample"
    p = _problem(layer, density, batch, sharing)
    benchmark.group = "%s d=%s B=%d" % (layer, density, batch)
    info = _info(layer, p, batch)
    info["impl"] = impl
    info["sharing"] = sharing
    benchmark.extra_info.update(info)
    s, pad = p["stride"], p["padding"]

    if impl == "dense_masked":
        def fn():
            y = F.conv2d(p["x_dense"], p["weight"], p["bias"], s, pad)
            if p["relu"]:
                y = torch.relu(y)
            return y * p["out_mask"]

        # correctness: the active channels of the dense masked output are the op's output
        y = fn()
        got = y.gather(1, p["out_idx"].long()[:, :, None, None].expand(-1, -1, y.shape[2], y.shape[3]))
        ref = gathered_conv2d_reference(p["x"], p["in_idx"], p["weight"], p["bias"], p["out_idx"],
                                        p["sample_group"], None, s, pad, 1, p["relu"])
    else:
        args = (p["x"], p["in_idx"], p["weight"], p["bias"], p["out_idx"], p["sample_group"], None, [s, s],
                [pad, pad], [1, 1], p["relu"])
        op = torch.ops.gencnp_fast.gathered_conv2d

        def fn():
            return op(*args)

        got = fn()
        ref = gathered_conv2d_reference(p["x"], p["in_idx"], p["weight"], p["bias"], p["out_idx"],
                                        p["sample_group"], None, s, pad, 1, p["relu"])
    err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    assert err <= 1e-4, err
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=_rounds(fn), iterations=1, warmup_rounds=1)
