"""GFLOP/s of gathered_conv2d vs dense F.conv2d (mkldnn) on the same *compacted* sizes.

    python benchmarks/kernel_gflops.py [--density 0.25] [--batch 64] [--threads 2]

Shapes: the CIFAR VGG-16 3x3 layers at 32/16/8/4/2 (channels 64..512 times the density), the first
layer (3 -> 64*density), ResNet 1x1 stride-2 downsamples, the Linear head (512*density -> 10).
"dense" is F.conv2d on a dense [B, Kin, H, W] input with a [Kout, Kin, k, k] weight (the ideal the
op is compared to); the op runs with one shared mask and with one mask per sample.
Runs with gencnp_fast.tune_allocator() applied. With --threads 1 times are thread CPU time (robust
on a busy machine); otherwise wall clock.
Every shape is checked against gathered_conv2d_reference before timing. Reports the minimum.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from gencnp_fast import tune_allocator
from gencnp_fast.kernels.contract import gathered_conv2d_reference
from gencnp_fast.ops import gathered_conv2d

# (C_in, C_out, H, k, stride, padding); input channels of the first layer are never masked,
# the logits of the Linear head are never masked.
SHAPES = [
    (64, 64, 32, 3, 1, 1), (128, 128, 16, 3, 1, 1), (256, 256, 8, 3, 1, 1), (512, 512, 4, 3, 1, 1),
    (512, 512, 2, 3, 1, 1), (3, 64, 32, 3, 1, 1), (128, 256, 16, 1, 2, 0), (256, 512, 8, 1, 2, 0),
    (512, 10, 1, 1, 1, 0),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()
    tune_allocator()  # steady-state timings, as in the pytest benchmarks
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    clock = time.thread_time if a.threads == 1 else time.perf_counter

    def tm(f):
        f()
        best = float("inf")
        for _ in range(a.reps):
            t0 = clock()
            f()
            best = min(best, clock() - t0)
        return best

    B, d = a.batch, a.density
    print("B=%d density=%s threads=%d clock=%s" % (B, d, a.threads, clock.__name__))
    for (C_in, C_out, H, k, s, p) in SHAPES:
        Kin = C_in if C_in == 3 else max(1, int(C_in * d))
        Kout = C_out if C_out == 10 else max(1, int(C_out * d))
        w = torch.randn(C_out, C_in, k, k)
        bias = torch.randn(C_out)
        Ho = (H + 2 * p - k) // s + 1
        flops = 2 * B * Kout * Kin * k * k * Ho * Ho
        xd, wd = torch.randn(B, Kin, H, H), torch.randn(Kout, Kin, k, k)
        td = tm(lambda: F.conv2d(xd, wd, None, s, p))
        line = ["(%d,%d,%d,k%ds%d) dense %6.1f GF/s %7.3fms" % (Kin, Kout, H, k, s, flops / td / 1e9, td * 1e3)]
        for kind in ["shared", "sample"]:
            ng = 1 if kind == "shared" else B
            sample_group = (torch.arange(B) % ng).int()
            ii = torch.empty(B, Kin, dtype=torch.int32)
            oi = torch.empty(B, Kout, dtype=torch.int32)
            for gg in range(ng):
                ii[sample_group == gg] = torch.randperm(C_in)[:Kin].sort().values.int()
                oi[sample_group == gg] = torch.randperm(C_out)[:Kout].sort().values.int()
            x = torch.randn(B, Kin, H, H)
            kw = dict(x=x, in_idx=ii, weight=w, bias=bias, out_idx=oi, sample_group=sample_group, residual=None,
                      stride=s, padding=p, dilation=1, relu=True)
            ref = gathered_conv2d_reference(**kw)
            err = float((gathered_conv2d(**kw) - ref).norm() / ref.norm())
            assert err < 1e-4, err
            t = tm(lambda: gathered_conv2d(**kw))
            line.append("%s %6.1f GF/s %7.3fms (%.2fx dense)" % (kind, flops / t / 1e9, t * 1e3, td / t))
        print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()
