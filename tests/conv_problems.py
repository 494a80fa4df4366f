"""Random problems of the gathered conv (the contract of ``gencnp_fast::gathered_conv2d``), shared by the op tests
(tests/test_ops.py) and the GPU kernel tests (tests/test_gpu_kernels.py). A helper module, not a test file."""
from __future__ import annotations

import torch


def make_problem(B, C_in, C_out, Kin, Kout, H, W, k, sharing, stride=1, padding=1, dilation=1, relu=True,
                 residual=True, bias=True, gen=None, seed=0, n_in=None, n_out=None, kw=None, group_ids=None,
                 scale_weight=False):
    """Random compact problem (float32, CPU): per group a random sorted subset of channels, -1 padded.

    ``gen`` (else a generator seeded with ``seed``) draws everything; ``group_ids`` relabels the groups;
    ``scale_weight`` divides the weight by sqrt(fan-in) (keeps activations O(1) through half-precision tests).
    """
    from gencnp_fast.ops import conv_output_size

    gen = gen if gen is not None else torch.Generator().manual_seed(seed)
    kw = k if kw is None else kw
    ngroups = {"shared": 1, "class": min(3, B), "sample": B}[sharing]
    groups = (torch.arange(B) % ngroups).to(torch.int32)
    in_idx = torch.full((B, Kin), -1, dtype=torch.int32)
    out_idx = torch.full((B, Kout), -1, dtype=torch.int32)
    for gg in range(ngroups):
        ni = n_in if n_in is not None else int(torch.randint(0, min(Kin, C_in) + 1, (1,), generator=gen))
        no = n_out if n_out is not None else int(torch.randint(0, min(Kout, C_out) + 1, (1,), generator=gen))
        ic = torch.randperm(C_in, generator=gen)[:ni].sort().values.to(torch.int32)
        oc = torch.randperm(C_out, generator=gen)[:no].sort().values.to(torch.int32)
        sel = groups == gg
        in_idx[sel, :ni] = ic
        out_idx[sel, :no] = oc
    if group_ids is not None:
        groups = torch.tensor(group_ids, dtype=torch.int32)[groups.long()]
    x = torch.randn(B, Kin, H, W, generator=gen) * (in_idx >= 0).float()[:, :, None, None]
    weight = torch.randn(C_out, C_in, k, kw, generator=gen)
    if scale_weight:
        weight = weight / (C_in * k * kw) ** 0.5
    b = torch.randn(C_out, generator=gen) if bias else None
    Ho, Wo = conv_output_size(H, W, k, kw, stride, padding, dilation)
    r = torch.randn(B, Kout, Ho, Wo, generator=gen) if residual else None
    return dict(x=x, in_idx=in_idx, weight=weight, bias=b, out_idx=out_idx, groups=groups, residual=r,
                stride=stride, padding=padding, dilation=dilation, relu=relu)
