"""The GPU gathered-conv kernels and their engine backends: "triton" (gencnp_fast/kernels/triton_conv.py) and
"cuda" (csrc/cuda/gathered_conv_cuda.cu through ``torch.ops.gencnp_fast.gathered_conv2d``).

Every kernel and engine test below takes a ``backend`` parameter. Where they run:
  * on a GPU (torch.cuda available, TRITON_INTERPRET unset): directly, on CUDA tensors, in this process, for
    "triton" and (where the extension was built with CUDA) "cuda"; the Triton tile sizes come from its rule
    (GENCNP_FAST_TRITON_AUTOTUNE=0, set here) so that the suite does not time every candidate for every shape;
    ``test_triton_autotuned_path`` runs the autotuned launch;
  * on a CPU machine: ``test_interpreter_subprocess`` re-runs this file in a child pytest with
    ``TRITON_INTERPRET=1`` (set before triton is imported, and kept out of this process so other test modules
    are unaffected): the Triton kernel source, interpreted on CPU tensors, on tiny shapes (~3000x slower).
    In that child every Triton test below runs; in the parent they are skipped as "runs in the child". The CUDA
    kernel cannot run without a GPU (its build is checked by tests/test_cuda_build.py).

Tolerance (DESIGN §8, flash-attention style): the kernel's error against a float64 reference is at most twice the
error of torch's own computation in the same dtype (the plain-torch reference op run in that dtype), plus a floor
of a few units of the dtype's rounding error. bfloat16 is not tested in the interpreter (it gets bf16 tl.dot
wrong), only on a GPU.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import conv_problems  # tests/conv_problems.py

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_GPU = torch.cuda.is_available()
RUN_KERNELS = HAS_TRITON and (INTERPRET or HAS_GPU)
DEVICE = "cuda" if (HAS_GPU and not INTERPRET) else "cpu"
# bf16 tl.dot is wrong in the interpreter; fp16 runs there.
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])


def _cuda_kernels_built() -> bool:
    if not HAS_GPU or INTERPRET:
        return False
    try:
        from gencnp_fast.kernels.gpu_backends import cuda_kernels_available
    except ImportError:
        return False
    return cuda_kernels_available()


# The backends whose kernels run here: triton on a GPU or in the interpreter child, cuda on a GPU with the CUDA build.
KERNEL_BACKENDS = (["triton"] if RUN_KERNELS else []) + (["cuda"] if _cuda_kernels_built() else [])

kernel_test = pytest.mark.skipif(
    not RUN_KERNELS,
    reason="no GPU: runs in the TRITON_INTERPRET=1 child process (test_interpreter_subprocess)",
)


@pytest.fixture(params=["triton", "cuda"])
def backend(request):
    """Each GPU backend; skipped where its kernel cannot run here (cuda: needs a GPU and the CUDA build)."""
    if request.param not in KERNEL_BACKENDS:
        if request.param == "cuda" and HAS_GPU and not INTERPRET:
            pytest.skip("the extension was built without CUDA kernels (pip install with nvcc present; docs/gpu.md)")
        pytest.skip(f"{request.param}: no GPU here" + (" (the interpreter runs triton only)" if INTERPRET else ""))
    return request.param


@pytest.fixture(autouse=True, scope="module")
def _triton_rule_configs():
    """Triton tile sizes by rule in this file (the autotuned launch has its own test)."""
    old = os.environ.get("GENCNP_FAST_TRITON_AUTOTUNE")
    os.environ["GENCNP_FAST_TRITON_AUTOTUNE"] = "0"
    yield
    if old is None:
        os.environ.pop("GENCNP_FAST_TRITON_AUTOTUNE", None)
    else:
        os.environ["GENCNP_FAST_TRITON_AUTOTUNE"] = old


# ----------------------------------------------------------------------------------------------------------------
# the CPU-machine driver

def _interpreter_loop_bound_bug() -> bool:
    """Triton < 3.7's interpreter turns a loop bound loaded from memory into a Python int with ``int()`` of a
    1-element array, which NumPy 2 refuses (TypeError); 3.7 squeezes it first. Compiled code is unaffected."""
    if not HAS_TRITON:
        return False
    import re

    import numpy as np
    import triton

    if tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2]) >= (3, 7):
        return False
    try:
        int(np.zeros(1))
    except TypeError:
        return True
    return False


@pytest.mark.skipif(INTERPRET, reason="already the interpreter child")
@pytest.mark.skipif(HAS_GPU, reason="a GPU is present: the kernel tests run directly")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(_interpreter_loop_bound_bug(), reason="this triton's interpreter cannot run the kernel under "
                    "NumPy 2 (int() of a 1-element loop bound; fixed in triton 3.7): test_aot_compile_sm90 still "
                    "compiles the kernel")
def test_interpreter_subprocess():
    """Run every kernel test of this file under TRITON_INTERPRET=1 in a fresh interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly",
           os.path.abspath(__file__)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    tail = (proc.stdout + proc.stderr)[-6000:]
    print(tail)
    assert proc.returncode == 0, f"interpreter run failed (rc={proc.returncode}):\n{tail}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail


def test_triton_backend_registration():
    """Registered with the engine; on a CPU machine without the interpreter it does not claim CPU tensors."""
    from gencnp_fast.kernels import gpu_backends  # noqa: F401  (idempotent; the engine imports it too)
    from gencnp_fast.plan.engine import _CONV_BACKENDS, available_backends

    assert "triton" in _CONV_BACKENDS and "cuda" in _CONV_BACKENDS
    devices = _CONV_BACKENDS["triton"][2]
    assert "cuda" in devices
    assert ("cpu" in devices) == INTERPRET
    if not INTERPRET:
        assert "triton" not in available_backends("cpu")
        assert "cuda" not in available_backends("cpu")
    elif HAS_TRITON:
        assert "triton" in available_backends("cpu")


# ----------------------------------------------------------------------------------------------------------------
# helpers

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    den = float(b.norm())
    num = float((a - b).norm())
    return num / den if den > 0 else num


def assert_close_to_fp64(out: torch.Tensor, torch_out: torch.Tensor, ref64: torch.Tensor, what: str = "") -> None:
    """DESIGN §8: ‖out − ref64‖/‖ref64‖ ≤ 2 · ‖torch_out − ref64‖/‖ref64‖ + floor(dtype).

    ``torch_out`` is torch's own computation of the same thing in ``out``'s dtype; ``ref64`` the float64 one on
    the same (dtype-rounded) inputs. The floor (a few units of rounding error of the dtype) keeps the bound
    meaningful where torch happens to be nearly exact.
    """
    floor = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[out.dtype]
    e_kernel = rel_err(out, ref64)
    e_torch = rel_err(torch_out, ref64)
    assert e_kernel <= 2 * e_torch + floor, f"{what} kernel error {e_kernel:.3g} vs torch {e_torch:.3g} ({out.dtype})"


# Random problems: tests/conv_problems.py, weights scaled by 1/sqrt(fan-in) here (float16 / bfloat16 stay O(1)).
make_problem = functools.partial(conv_problems.make_problem, scale_weight=True)


def reference(p, dtype=torch.float64, device="cpu"):
    """The plain-torch op (one F.conv2d per group) in ``dtype`` on ``device``."""
    from gencnp_fast.ops import gathered_conv2d_reference

    return gathered_conv2d_reference(**_cast(p, dtype, device))


def dense_oracle(p):
    """float64 F.conv2d on the densely scattered input, then the active outputs (independent of the op code)."""
    import torch.nn.functional as F

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


def _cast(p, dtype, device):
    q = dict(p)
    for k in ("x", "weight", "bias", "residual"):
        if q[k] is not None:
            q[k] = q[k].to(device=device, dtype=dtype)
    for k in ("in_idx", "out_idx", "groups"):
        q[k] = q[k].to(device)
    return q


def run_kernel(p, dtype=torch.float32, backend="triton"):
    q = _cast(p, dtype, DEVICE)
    if backend == "triton":
        from gencnp_fast.kernels.triton_conv import gathered_conv2d_triton

        return gathered_conv2d_triton(**q)
    from gencnp_fast.ops import gathered_conv2d  # the dispatcher op: its CUDA kernel on CUDA tensors

    assert DEVICE == "cuda"
    return gathered_conv2d(**q)


def check(p, dtype=torch.float32, backend="triton"):
    """Kernel vs the float64 dense oracle, with the dtype-aware bound; padding outputs exactly zero."""
    out = run_kernel(p, dtype, backend)
    assert out.dtype == dtype and out.device.type == DEVICE
    # inputs rounded to the dtype first, so only the computation's error is measured
    p64 = _cast(_cast(p, dtype, "cpu"), torch.float64, "cpu")
    ref64 = dense_oracle(p64)
    assert out.shape == ref64.shape
    if dtype == torch.float32:
        assert rel_err(out, ref64) <= 1e-5, rel_err(out, ref64)
    else:
        torch_dev = DEVICE if DEVICE == "cuda" else "cpu"
        torch_out = reference(_cast(p, dtype, "cpu"), dtype, torch_dev)
        assert_close_to_fp64(out, torch_out, ref64)
    pad = (p["out_idx"] < 0).to(out.device)
    if bool(pad.any()):
        assert bool((out[pad] == 0).all()), "padding output channels must be exact zeros"
    return out


# ----------------------------------------------------------------------------------------------------------------
# kernel tests (GPU, or the interpreter child)

@kernel_test
@pytest.mark.parametrize("sharing", ["shared", "class", "sample"])
@pytest.mark.parametrize("k,stride,padding,dilation", [
    (3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2), (1, 1, 0, 1), (1, 2, 0, 1), (5, 2, 2, 1), (7, 2, 3, 1),
])
def test_conv_matches_fp64(backend, sharing, k, stride, padding, dilation):
    check(make_problem(4, 6, 7, 5, 6, 8, 8, k, sharing, stride, padding, dilation), backend=backend)


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sharing", ["shared", "sample"])
def test_dtypes(backend, dtype, sharing):
    check(make_problem(3, 8, 20, 8, 18, 8, 8, 3, sharing, seed=3), dtype, backend)


@kernel_test
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_epilogue_variants(backend, relu, residual, bias):
    check(make_problem(3, 5, 6, 4, 5, 6, 6, 3, "class", relu=relu, residual=residual, bias=bias, seed=1),
          backend=backend)


@kernel_test
def test_ragged_tiles_many_m_and_n_tiles(backend):
    """More than one M tile (64 pixels x 2 samples per group) and N tile (Kout 40 > BN) per problem."""
    B = 5
    p = make_problem(B, 9, 45, 9, 40, 8, 8, 3, "class", seed=2, n_out=None)
    check(p, backend=backend)
    p = make_problem(B, 9, 45, 9, 40, 8, 8, 3, "shared", seed=4, n_in=9, n_out=40)
    check(p, backend=backend)


@kernel_test
def test_kin_zero_is_bias_plus_residual(backend):
    p = make_problem(3, 4, 5, 3, 4, 5, 5, 3, "sample", n_in=0, seed=5)
    check(p, backend=backend)
    p2 = make_problem(2, 4, 5, 0, 4, 5, 5, 3, "sample", n_in=0, seed=5)  # Kin == 0: an empty input tensor
    check(p2, backend=backend)


@kernel_test
def test_kout_zero_and_empty_output_groups(backend):
    p = make_problem(3, 4, 5, 3, 0, 5, 5, 3, "sample", seed=6)
    out = run_kernel(p, backend=backend)
    assert out.shape == (3, 0, 5, 5)
    check(make_problem(4, 4, 5, 3, 4, 5, 5, 3, "sample", n_out=0, seed=7), backend=backend)


@kernel_test
def test_batch_one_rectangular_kernel_odd_sizes(backend):
    check(make_problem(1, 3, 4, 3, 4, 7, 5, 3, "sample", kw=1, padding=1, seed=8), backend=backend)
    check(make_problem(2, 5, 3, 5, 3, 9, 6, 2, "shared", kw=3, stride=2, padding=0, seed=9), backend=backend)


@kernel_test
def test_arbitrary_group_ids(backend):
    check(make_problem(5, 6, 6, 5, 5, 6, 6, 3, "class", group_ids=[17, 3, 250], seed=10), backend=backend)


@kernel_test
def test_padding_channels_are_never_read(backend):
    """NaN in every padded input channel: a kernel that read (or multiplied) them would produce NaN."""
    p = make_problem(4, 6, 7, 6, 6, 6, 6, 3, "sample", seed=11)
    x = p["x"].clone()
    x[p["in_idx"] < 0] = float("nan")
    p["x"] = x
    out = run_kernel(p, backend=backend)
    assert not bool(torch.isnan(out).any())
    clean = dict(p, x=torch.nan_to_num(x, nan=0.0))
    assert rel_err(out, dense_oracle(clean)) <= 1e-5


@kernel_test
def test_linear(backend):
    """A linear layer: the op on [B, K, 1, 1] (the Triton wrapper, or the 1x1 conv the engine runs for "cuda")."""
    p = make_problem(6, 30, 20, 24, 18, 1, 1, 1, "class", padding=0, seed=12)
    q = _cast(p, torch.float32, DEVICE)
    x, w, r = q["x"].reshape(6, -1), q["weight"].reshape(20, 30), q["residual"].reshape(6, -1)
    if backend == "triton":
        from gencnp_fast.kernels.triton_conv import gathered_linear_triton

        out = gathered_linear_triton(x, q["in_idx"], w, q["bias"], q["out_idx"], q["groups"], r, relu=True)
    else:
        from gencnp_fast.ops import gathered_conv2d

        out = gathered_conv2d(x[:, :, None, None], q["in_idx"], w[:, :, None, None], q["bias"], q["out_idx"],
                              q["groups"], r[:, :, None, None], relu=True).reshape(6, -1)
    assert out.shape == (6, 18)
    assert rel_err(out, dense_oracle(p).reshape(6, -1)) <= 1e-5


@kernel_test
def test_bad_inputs_raise(backend):
    """Bad input is refused on the host with a message naming the problem (the CUDA op raises RuntimeError)."""
    if backend == "triton":
        from gencnp_fast.kernels.triton_conv import gathered_conv2d_triton as op

        kinds = {"dtype": TypeError, "shape": ValueError}
    else:
        from gencnp_fast.ops import gathered_conv2d as op

        kinds = {"dtype": RuntimeError, "shape": RuntimeError}
    q = _cast(make_problem(2, 4, 4, 3, 3, 5, 5, 3, "sample"), torch.float32, DEVICE)
    with pytest.raises(kinds["dtype"], match="int32"):
        op(**dict(q, in_idx=q["in_idx"].long()))
    with pytest.raises(kinds["dtype"], match="weight"):
        op(**dict(q, weight=q["weight"].double()))
    with pytest.raises(kinds["shape"], match="larger than"):
        op(**dict(q, padding=0, dilation=4))
    with pytest.raises(kinds["shape"], match="residual"):
        op(**dict(q, residual=q["residual"][:, :1]))


# ----------------------------------------------------------------------------------------------------------------
# the whole pathway forward with a GPU backend against the dense masked reference

def _tiny_models():
    from gencnp_fast import models

    return {
        "resnet_basic": lambda: models.ResNet(models.BasicBlock, [1, 1], num_classes=10, width=4, cifar_stem=True),
        "resnet_bottleneck": lambda: models.ResNet(models.Bottleneck, [1, 1], num_classes=6, width=4,
                                                   cifar_stem=True),
        "vgg": lambda: models.VGG(models.make_vgg_features([4, "M", 8, 8, "M", 8], True), num_classes=5,
                                  pool_size=1, hidden=12, feature_channels=8),
    }


# CUDA tensors are always planned on the host (engine._Sets); CPU tensors in the interpreter run both ways.
PLANNING = ["host"] if DEVICE == "cuda" else ["direct", "host"]


@kernel_test
@pytest.mark.parametrize("planning", PLANNING)
@pytest.mark.parametrize("name", ["resnet_basic", "resnet_bottleneck", "vgg"])
@pytest.mark.parametrize("sharing,density", [("shared", 0.5), ("per_class", 0.25), ("per_sample", 0.5),
                                             ("per_sample", 1.0), ("per_sample", 0.0)])
def test_fast_pathway_forward(backend, name, sharing, density, planning, monkeypatch):
    import gencnp_fast as g
    from gencnp_fast import models
    from gencnp_fast.kernels import gpu_backends  # noqa: F401  (registers "triton" if the engine has not yet)
    from gencnp_fast.plan import engine

    monkeypatch.setattr(engine, "HOST_PLANNING", planning == "host")

    torch.manual_seed(0)
    model = models.randomize_bn(_tiny_models()[name](), torch.Generator().manual_seed(0)).eval().to(DEVICE)
    batch = 3
    gen = torch.Generator().manual_seed(hash((name, sharing, density)) % 2**31)
    x = torch.randn(batch, 3, 8, 8, generator=gen).to(DEVICE)
    units = g.pathway_units(model, x)
    if sharing == "shared":
        path = g.Pathway.random(units, density, None, generator=gen, device=DEVICE)
    elif sharing == "per_class":
        path = g.Pathway.random(units, density, batch, groups=torch.arange(batch) % 2, generator=gen, device=DEVICE)
    else:
        path = g.Pathway.random(units, density, batch, generator=gen, device=DEVICE)
    ref = g.reference_pathway_forward(model, path, x)
    out = g.fast_pathway_forward(model, path, x, backend=backend)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-4, rel_err(out, ref)


@kernel_test
def test_fast_pathway_forward_mixed_empty_and_full_units(backend):
    import gencnp_fast as g
    from gencnp_fast import models
    from gencnp_fast.kernels import gpu_backends  # noqa: F401

    model = models.randomize_bn(_tiny_models()["resnet_basic"](), torch.Generator().manual_seed(1)).eval()
    model = model.to(DEVICE)
    x = torch.randn(4, 3, 8, 8).to(DEVICE)
    units = g.pathway_units(model, x)
    path = dict(g.Pathway.random(units, 0.4, 4, generator=torch.Generator().manual_seed(1), device=DEVICE))
    path[units[1].name][0] = False  # sample 0: an empty unit
    path[units[2].name][1] = True  # sample 1: a full unit
    del path[units[3].name]  # a unit kept whole
    ref = g.reference_pathway_forward(model, path, x)
    assert rel_err(g.fast_pathway_forward(model, path, x, backend=backend), ref) <= 1e-4


gpu_only = pytest.mark.skipif(not HAS_GPU or INTERPRET, reason="needs a GPU (too large for the interpreter)")


@gpu_only
@pytest.mark.parametrize("name", ["resnet18_cifar", "vgg16_bn_cifar"])
@pytest.mark.parametrize("sharing,density", [("shared", 0.25), ("per_class", 0.5), ("per_sample", 0.25),
                                             ("per_sample", 0.1), ("per_sample", 1.0)])
def test_full_size_models(backend, name, sharing, density):
    """The benchmark models (64-512 channels, 32x32 down to 2x2 maps: several M and N tiles, every tile family)."""
    import gencnp_fast as g
    from gencnp_fast import models

    model = models.randomize_bn(getattr(models, name)(), torch.Generator().manual_seed(2)).eval().to(DEVICE)
    batch = 12
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(DEVICE)
    units = g.pathway_units(model, x)
    groups = {"shared": None, "per_class": torch.arange(batch) % 4, "per_sample": None}[sharing]
    n = None if sharing == "shared" else batch
    path = g.Pathway.random(units, density, n, groups=groups, generator=gen, device=DEVICE)
    with torch.no_grad():
        ref = g.reference_pathway_forward(model.double(), path, x.double())
        model.float()
    out = g.fast_pathway_forward(model, path, x, backend=backend)
    assert rel_err(out, ref) <= 1e-4, rel_err(out, ref)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sharing", ["shared", "per_sample"])
def test_half_precision_models(backend, dtype, sharing):
    """DESIGN §8 on a whole model: the fast path's error against a float64 reference is within 2x torch's own
    (the dense masked reference run in the same dtype), plus a few units of rounding."""
    import gencnp_fast as g
    from gencnp_fast import models

    model = models.randomize_bn(models.resnet18_cifar(), torch.Generator().manual_seed(4)).eval().to(DEVICE)
    batch = 8
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(DEVICE).to(dtype)
    units = g.pathway_units(model, x.float())
    path = g.Pathway.random(units, 0.5, None if sharing == "shared" else batch, generator=gen, device=DEVICE)
    with torch.no_grad():
        ref64 = g.reference_pathway_forward(model.double(), path, x.double())
        torch_out = g.reference_pathway_forward(model.to(dtype), path, x)
    out = g.fast_pathway_forward(model, path, x, backend=backend)
    assert out.dtype == dtype
    assert_close_to_fp64(out, torch_out, ref64, f"{backend} {sharing}")


@gpu_only
def test_auto_backend_on_cuda_tensors():
    """backend="auto" on CUDA tensors picks a GPU backend (cuda, else triton) and matches the reference."""
    import gencnp_fast as g
    from gencnp_fast import models
    from gencnp_fast.plan.engine import available_backends

    assert set(KERNEL_BACKENDS) <= set(available_backends("cuda"))
    model = models.randomize_bn(_tiny_models()["resnet_basic"](), torch.Generator().manual_seed(6)).eval()
    model = model.to(DEVICE)
    x = torch.randn(5, 3, 8, 8).to(DEVICE)
    path = g.Pathway.random(g.pathway_units(model, x), 0.5, 5, generator=torch.Generator().manual_seed(6),
                            device=DEVICE)
    out = g.fast_pathway_forward(model, path, x)
    assert out.device.type == "cuda"
    assert rel_err(out, g.reference_pathway_forward(model, path, x)) <= 1e-4


@kernel_test
def test_triton_autotuned_path(monkeypatch):
    """The autotuned launch (the default outside the test suite) gives the rule-picked launch's result: on a GPU
    it times the candidates that fit each shape; in the interpreter it has the one configuration."""
    from gencnp_fast.kernels import triton_conv as tc

    monkeypatch.setenv("GENCNP_FAST_TRITON_AUTOTUNE", "1")
    assert tc.autotune_enabled() == (not INTERPRET)
    for p in (make_problem(3, 9, 40, 9, 36, 8, 8, 3, "sample", seed=13),
              make_problem(4, 16, 24, 16, 20, 2, 2, 3, "shared", seed=14)):
        check(p, backend="triton")


# ----------------------------------------------------------------------------------------------------------------
# the Triton tile rule and the autotuner's pruning (plain Python: run everywhere)

@pytest.mark.skipif(INTERPRET, reason="checked in the parent process")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_tile_rule_and_pruning():
    from gencnp_fast.kernels import triton_conv as tc

    def kw(c):
        return c.kwargs["BM"], c.kwargs["BN"]

    def key(c):
        return c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"], c.num_warps, c.num_stages

    # rule: 16-row tiles for small M, 32-column tiles for narrow layers, 128x128 for large maps x wide layers
    assert kw(tc.heuristic_config(1, 4, 512))[0] == 16  # a 2x2 map, one sample
    assert kw(tc.heuristic_config(1, 1, 10)) == (16, 32)  # a linear layer
    assert kw(tc.heuristic_config(64, 1024, 24))[1] == 32
    assert kw(tc.heuristic_config(64, 50176, 256)) == (128, 128)
    assert kw(tc.heuristic_config(1, 196, 128)) == (64, 64)
    for cnt, howo, kout in [(1, 1, 1), (1, 4, 512), (3, 64, 33), (64, 50176, 64), (2, 300, 1000)]:
        cfg = tc.heuristic_config(cnt, howo, kout)  # one of the autotuner's candidates
        assert key(cfg) in {key(c) for c in tc._CONFIGS}
        # pruning keeps at least one candidate, never a 64+-row tile for M <= 64 nor a 16/32-row one for M >= 1024
        kept = tc._prune_configs(tc._CONFIGS, dict(MAX_CNT=cnt, HOWO=howo, KOUT=kout))
        assert kept and all(c in tc._CONFIGS for c in kept)
        m = cnt * howo
        if m <= 64:
            assert all(c.kwargs["BM"] <= 32 for c in kept)
        if m >= 1024:
            assert all(c.kwargs["BM"] >= 64 for c in kept)
        if kout <= 64:
            assert all(c.kwargs["BN"] <= 64 for c in kept)
        assert len(kept) < len(tc._CONFIGS) or len(tc._CONFIGS) == 1 or 64 < m < 1024
    assert os.environ.get("GENCNP_FAST_TRITON_AUTOTUNE") == "0"  # this file's default
    assert not tc.autotune_enabled()


# ----------------------------------------------------------------------------------------------------------------
# ahead-of-time compilation for an H100 (sm_90) without a GPU: the real (non-interpreted) code path of the kernel,
# through Triton's MLIR pipeline and ptxas, for every dtype, autotune configuration family and epilogue variant

def _ptxas_available() -> bool:
    if not HAS_TRITON:
        return False
    import triton

    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.path.exists(base) or os.environ.get("TRITON_PTXAS_PATH") is not None


@pytest.mark.skipif(INTERPRET, reason="the interpreter child does not compile")
@pytest.mark.skipif(not _ptxas_available(), reason="triton (with its ptxas) is not installed")
@pytest.mark.parametrize("dtype,cfg_i,variant", [
    ("fp32", 0, "full"), ("fp32", -1, "plain1x1"),
    ("fp16", 0, "full"), ("fp16", 3, "plain1x1"), ("fp16", -1, "full"),
    ("bf16", 1, "full"), ("bf16", -2, "plain1x1"),
])
def test_aot_compile_sm90(dtype, cfg_i, variant):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gencnp_fast.kernels import triton_conv as tc

    if tc.INTERPRET:
        pytest.skip("triton_conv was imported under the interpreter")
    jit = tc._gathered_conv2d_kernel  # the plain @triton.jit function (the autotuned wrapper launches it)
    names = jit.arg_names
    tensors = ("x_ptr", "w_ptr", "bias_ptr", "res_ptr", "out_ptr")
    sig = {n: ("*" + dtype if n in tensors else "*i32") if n.endswith("_ptr") else "i32" for n in names}
    cfg = tc._CONFIGS[cfg_i]
    k = 3 if variant == "full" else 1
    full = variant == "full"
    const = dict(KH=k, KW=k, HAS_BIAS=full, HAS_RES=full, RELU=full,
                 DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", **cfg.kwargs)
    sig.update({n: "constexpr" for n in const})
    src = ASTSource(fn=jit, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    ptx = kernel.asm["ptx"]
    assert ".target sm_90" in ptx
    assert len(kernel.asm["cubin"]) > 0
    if dtype != "fp32":
        assert "mma" in ptx, "float16/bfloat16 dots should use the tensor cores"
