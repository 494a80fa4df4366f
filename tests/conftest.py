"""Shared test helpers: where each backend runs, the error measures and oracles, random op problems.

Backends (``backend`` fixture, :data:`BACKENDS`): every op and engine test body runs once per backend, skipped with
the reason where that backend cannot run here:
  * ``cpu`` (the compiled CPU kernel) and ``torch`` (the plain-torch conv): CPU tensors, in this process;
  * ``triton``: on a GPU in this process; on a CPU machine in the ``TRITON_INTERPRET=1`` child process that
    ``tests/test_triton_interpreter.py`` starts (the interpreter must be chosen before triton is imported);
  * ``cuda``: on a GPU, with the extension built with its CUDA kernels.
In the interpreter child only the ``triton`` cases run. Under ``CI=true`` a missing compiled extension is an error,
not a skip.

Tolerance (docs/design.md §6, after flash-attention's tests): a kernel's error against a float64 oracle is at most
twice the error of torch's own computation in the same dtype, plus a floor of a few units of the dtype's rounding.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_GPU = torch.cuda.is_available() and not INTERPRET
GPU_DEVICE = "cuda" if HAS_GPU else "cpu"  # where the GPU backends' tensors live (CPU tensors in the interpreter)

BACKENDS = ["cpu", "torch", "triton", "cuda"]

if HAS_GPU:
    # Layers a pathway leaves whole run as the dense conv / linear (cuDNN, cuBLAS), under torch's precision
    # settings like the user's own model; by default cuDNN convolutions may use TF32 (10-bit mantissa: a 3e-4 to
    # 9e-4 relative error on the H200), which the float64-oracle bounds here are not written for. The gathered
    # kernels compute in IEEE float32 either way.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def extension_loads() -> bool:
    try:
        import gencnp_fast.ops  # noqa: F401
    except ImportError:
        return False
    return True


if os.environ.get("CI") == "true" and not extension_loads():
    raise RuntimeError("CI builds the compiled extension, but gencnp_fast.ops does not import: "
                       "the engine and op tests would all be skipped")


def _cuda_kernels_built() -> bool:
    return HAS_GPU and extension_loads() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "gencnp_fast::gathered_conv2d", "CUDA")


def skip_reason(backend: str) -> Optional[str]:
    """Why ``backend`` cannot run in this process (None: it runs)."""
    if not extension_loads():
        return "the compiled extension is not built (pip install --no-build-isolation -e .)"
    if backend in ("cpu", "torch"):
        return "runs in the parent process" if INTERPRET else None
    if backend == "triton":
        if not HAS_TRITON:
            return "triton is not installed"
        if not (HAS_GPU or INTERPRET):
            return "no GPU: runs in the TRITON_INTERPRET=1 child (tests/test_triton_interpreter.py)"
        return None
    if not HAS_GPU:
        return "needs a GPU"
    return None if _cuda_kernels_built() else "the extension was built without CUDA kernels (docs/gpu.md)"


def backend_device(backend: str) -> str:
    return "cpu" if backend in ("cpu", "torch") else GPU_DEVICE


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Each backend, skipped where it cannot run here."""
    reason = skip_reason(request.param)
    if reason:
        pytest.skip(f"{request.param}: {reason}")
    return request.param


# ---------------------------------------------------------------------------------------------------------------
# error measures

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64 (``‖a − b‖`` when ``b`` is zero)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    den = float(b.norm())
    num = float((a - b).norm())
    return num / den if den > 0 else num


FLOOR = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close_to_fp64(out: torch.Tensor, torch_out: torch.Tensor, ref64: torch.Tensor, what: str = "",
                         magnitude: Optional[torch.Tensor] = None) -> None:
    """``rel_err(out, ref64) <= 2 * rel_err(torch_out, ref64) + FLOOR[dtype] * max(1, cond)``: ``torch_out`` is
    torch's own computation of the same thing in ``out``'s dtype, ``ref64`` the float64 one on the same (rounded)
    inputs. ``magnitude`` (the float64 result on the absolute values of every input, :func:`magnitude_oracle`) gives
    the problem's conditioning ``cond = ‖magnitude‖ / ‖ref64‖``: where the sums cancel, any summation order's
    rounding error is that much larger relative to the result (a float32 sum's error is bounded by a few units of
    rounding times the sum of the terms' magnitudes, not of the result), and torch's own order may be luckier."""
    e_kernel, e_torch = rel_err(out, ref64), rel_err(torch_out, ref64)
    cond = 1.0
    if magnitude is not None:
        den = float(ref64.double().norm())
        cond = max(1.0, float(magnitude.double().norm()) / den) if den > 0 else 1.0
    assert e_kernel <= 2 * e_torch + FLOOR[out.dtype] * cond, \
        f"{what} kernel error {e_kernel:.3g} vs torch {e_torch:.3g} ({out.dtype}, conditioning {cond:.3g})"


# ---------------------------------------------------------------------------------------------------------------
# random problems of the gathered conv, and its float64 oracle

def make_problem(B, C_in, C_out, Kin, Kout, H, W, k, sharing, stride=1, padding=1, dilation=1, relu=True,
                 residual=True, bias=True, gen=None, seed=0, n_in=None, n_out=None, kw=None, group_ids=None,
                 scale_weight=False):
    """A random compact problem of ``gathered_conv2d`` (float32, CPU; keys are the op's argument names): per group
    a random sorted subset of channels, -1 padded. ``sharing``: ``"shared"`` (one group), ``"class"`` (3 groups)
    or ``"sample"`` (one group per sample). ``gen`` (else a generator seeded with ``seed``) draws everything;
    ``group_ids`` relabels the groups; ``scale_weight`` divides the weight by sqrt(fan-in) (keeps activations O(1)
    in half precision)."""
    from gencnp_fast.kernels.contract import conv_output_size

    gen = gen if gen is not None else torch.Generator().manual_seed(seed)
    kw = k if kw is None else kw
    ngroups = {"shared": 1, "class": min(3, B), "sample": B}[sharing]
    groups = (torch.arange(B) % max(ngroups, 1)).to(torch.int32)
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
    return dict(x=x, in_idx=in_idx, weight=weight, bias=b, out_idx=out_idx, sample_group=groups, residual=r,
                stride=stride, padding=padding, dilation=dilation, relu=relu)


def magnitude_oracle(p) -> torch.Tensor:
    """:func:`dense_oracle` on the absolute values of x, weight, bias and residual, without the ReLU: the sum of the
    magnitudes of every output's terms (the scale of its rounding error, :func:`assert_close_to_fp64`)."""
    ab = dict(p, x=p["x"].abs(), weight=p["weight"].abs(), relu=False)
    for k in ("bias", "residual"):
        if p.get(k) is not None:
            ab[k] = p[k].abs()
    return dense_oracle(ab)


def dense_oracle(p) -> torch.Tensor:
    """float64 ``F.conv2d`` on the densely scattered input, then the active outputs (independent of the op code)."""
    x, in_idx, weight, out_idx = p["x"].double(), p["in_idx"].long(), p["weight"].double(), p["out_idx"].long()
    B, Kin, H, W = x.shape
    C_in = weight.shape[1]
    dense = torch.zeros(B, C_in + 1, H, W, dtype=torch.float64)
    dense.scatter_(1, torch.where(in_idx >= 0, in_idx, C_in)[:, :, None, None].expand(B, Kin, H, W), x)
    y = F.conv2d(dense[:, :C_in], weight, None if p["bias"] is None else p["bias"].double(), p["stride"],
                 p["padding"], p["dilation"])
    Kout = out_idx.shape[1]
    out = y.gather(1, out_idx.clamp_min(0)[:, :, None, None].expand(B, Kout, y.shape[2], y.shape[3]))
    if p["residual"] is not None:
        out = out + p["residual"].double()
    if p["relu"]:
        out = out.relu()
    return out * (out_idx >= 0).double()[:, :, None, None]


# The CLI's bad-input contract ------------------------------------------------------------------------------------
def snapshot(path) -> dict:
    """Every file under ``path`` (hidden ones too) with its SHA-256; {} when it does not exist."""
    import hashlib

    out = {}
    if os.path.isdir(path):
        for root, _, files in os.walk(path):
            for f in files:
                p = os.path.join(root, f)
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    elif os.path.isfile(path):
        with open(path, "rb") as fh:
            out["."] = hashlib.sha256(fh.read()).hexdigest()
    return out


def fails(capsys, argv, *words, untouched=()):
    """``gencnp_fast.cli.main(argv)`` exits 2 with ONE line on stderr, ``gencnp CMD: error: ...``, holding every
    word of ``words``, and no traceback; the paths in ``untouched`` are byte for byte as before (no new, changed or
    temporary files). Returns the line."""
    import re

    from gencnp_fast.cli import main

    before = {str(p): snapshot(p) for p in untouched}
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert exc.value.code == 2, cap.err
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert len(lines) == 1, cap.err
    assert re.match(r"gencnp [\w-]+: error", lines[0]), lines[0]
    assert "Traceback" not in cap.err + cap.out
    for w in words:
        assert str(w) in lines[0], (w, lines[0])
    for p, snap in before.items():
        assert snapshot(p) == snap, f"{p} changed"
    return lines[0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under pytest-xdist (scripts/gpu_check.sh): a test that ended its process's CUDA context with a device-side
    assert takes the worker down with it, so that xdist starts a fresh one rather than failing every later test."""
    outcome = yield
    rep = outcome.get_result()
    if (rep.failed and call.excinfo is not None and os.environ.get("PYTEST_XDIST_WORKER")
            and "device-side assert" in str(call.excinfo.value)):
        print(f"{item.nodeid}: device-side assert, this CUDA context is gone; ending the worker", flush=True)
        os._exit(3)
