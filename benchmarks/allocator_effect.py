"""How much glibc's malloc settings move CPU timings (gencnp_fast.runtime.tune_allocator).

Each case runs in a fresh Python process, so the allocator starts from the same state:

- ``default``: glibc's defaults (activations above the dynamic mmap threshold get a fresh, page-faulted ``mmap``);
- ``tuned``: :func:`gencnp_fast.tune_allocator` first.

For each it times (median of 15 after one warm-up; three alternating pairs of processes) a batch-128 ``F.conv2d``
(128→128 channels, 7×7, 3×3 kernel), the dense ``mnist_vgg`` forward and ``dense_capture`` at batch 128, and prints
one line per case.

    python benchmarks/allocator_effect.py
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, sys, time
import torch, torch.nn.functional as F
import gencnp_fast
from gencnp_fast import models
from gencnp_fast.plan import dense_capture
if sys.argv[1] == "tuned":
    assert gencnp_fast.tune_allocator()

def med(fn, rounds=15):
    fn()
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return 1e3 * sorted(ts)[rounds // 2]

g = torch.Generator().manual_seed(0)
x = torch.randn(128, 128, 7, 7, generator=g); w = torch.randn(128, 128, 3, 3, generator=g); b = torch.randn(128, generator=g)
m = models.randomize_bn(models.mnist_vgg(), torch.Generator().manual_seed(0)).eval()
xi = torch.randn(128, 1, 28, 28, generator=g)
with torch.no_grad():
    out = dict(conv_ms=med(lambda: F.conv2d(x, w, b, padding=1)), dense_ms=med(lambda: m(xi)),
               capture_ms=med(lambda: dense_capture(m, xi)))
print(json.dumps(out))
"""


def main() -> None:
    for case in ("default", "tuned") * 3:
        res = subprocess.run([sys.executable, "-c", CHILD, case], capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{case:8s} conv2d 128x128x7x7 b128 {r['conv_ms']:6.1f} ms | mnist_vgg b128 forward {r['dense_ms']:6.1f} ms"
              f" | dense_capture {r['capture_ms']:6.1f} ms")


if __name__ == "__main__":
    main()
