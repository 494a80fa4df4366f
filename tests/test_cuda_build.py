"""The compiled extension of a CUDA build has a CUDA kernel for every gencnp_fast op.

Runs in the CUDA venv of ``.ci/cuda_build.sh`` (torch with CUDA, extension built with GENCNP_FAST_FORCE_CUDA=1);
needs no GPU: it only asks the dispatcher what is registered. Skips under a CPU-only torch. Where a GPU is
present it also runs each op once against the plain-torch reference.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU-only build (no CUDA kernels)")

NAMESPACE = "gencnp_fast"


def _ops_in_namespace():
    """Qualified names ('gencnp_fast::op') of every operator the library defines."""
    from gencnp_fast import ops  # noqa: F401  (loads gencnp_fast._C: registers the schemas and kernels)

    names = {n.split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith(NAMESPACE + "::")}
    # ops defined in Python (the Triton op gencnp_fast::gathered_conv2d_triton, registered when its module is
    # imported) are no part of the extension: they run on CUDA through their own code
    python_ops = set(getattr(torch._library.custom_ops, "OPDEFS", {}))
    # the Python namespace object, as a cross-check (attributes that resolve to operator packets)
    ns = getattr(torch.ops, NAMESPACE)
    for attr in dir(ns):
        if attr.startswith("_"):
            continue
        try:
            packet = getattr(ns, attr)
        except (AttributeError, RuntimeError):
            continue
        if isinstance(packet, torch._ops.OpOverloadPacket):
            names.add(f"{NAMESPACE}::{attr}")
    return sorted(names - python_ops)


def test_extension_was_built_with_cuda():
    from gencnp_fast import ops  # noqa: F401

    assert ops.__file__  # the package imports; its _C is the one pip built
    names = _ops_in_namespace()
    assert f"{NAMESPACE}::gathered_conv2d" in names, names


def test_every_op_has_a_cuda_kernel():
    names = _ops_in_namespace()
    assert names, "no gencnp_fast ops are registered"
    # a CompositeExplicitAutograd kernel (ATen ops: gather_channels) serves CUDA too
    missing = [n for n in names if not any(torch._C._dispatch_has_kernel_for_dispatch_key(n, k)
                                           for k in ("CUDA", "CompositeExplicitAutograd"))]
    assert not missing, f"ops without a CUDA kernel: {missing}"
    # and the CPU kernels are still there
    missing_cpu = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU")]
    assert not missing_cpu, f"ops without a CPU kernel: {missing_cpu}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here: registration checked, kernel not run")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_runs(dtype):
    from gencnp_fast.kernels.contract import gathered_conv2d_reference, problem_list

    g = torch.Generator().manual_seed(0)
    B, Cin, Cout, H = 5, 20, 70, 9
    sample_group = torch.tensor([0, 1, 0, 2, 3], dtype=torch.int32)
    in_idx = torch.full((B, 12), -1, dtype=torch.int32)
    out_idx = torch.full((B, 66), -1, dtype=torch.int32)
    for gg, (ni, no) in enumerate([(12, 66), (0, 5), (7, 0), (3, 40)]):
        sel = sample_group == gg
        in_idx[sel, :ni] = torch.randperm(Cin, generator=g)[:ni].sort().values.to(torch.int32)
        out_idx[sel, :no] = torch.randperm(Cout, generator=g)[:no].sort().values.to(torch.int32)
    x = torch.randn(B, 12, H, H, generator=g) * (in_idx >= 0).float()[:, :, None, None]
    w = torch.randn(Cout, Cin, 3, 3, generator=g) / 10
    bias = torch.randn(Cout, generator=g)
    res = torch.randn(B, 66, 5, 5, generator=g)
    ref = gathered_conv2d_reference(x.double(), in_idx, w.double(), bias.double(), out_idx, sample_group,
                                    res.double(), [2, 2], [1, 1], [1, 1], True)
    dev = [t.cuda() for t in (x, w, bias, res)]
    xd, wd, bd, rd = [t.to(dtype) for t in dev]
    out = torch.ops.gencnp_fast.gathered_conv2d(xd, in_idx.cuda(), wd, bd, out_idx.cuda(), sample_group.cuda(), rd,
                                                [2, 2], [1, 1], [1, 1], True)
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    err = float((out.double().cpu() - ref).norm() / ref.norm())
    assert err <= tol, err
    assert (out.cpu()[out_idx < 0] == 0).all()
    # with the planned problem list (no synchronisation in the op): the same launch
    problems, max_group = problem_list(sample_group)
    planned = torch.ops.gencnp_fast.gathered_conv2d(xd, in_idx.cuda(), wd, bd, out_idx.cuda(), sample_group.cuda(),
                                                    rd, [2, 2], [1, 1], [1, 1], True, problems.cuda(), max_group)
    assert torch.equal(planned, out)
