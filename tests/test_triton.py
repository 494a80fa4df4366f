"""The Triton gathered-conv kernel (gencnp_fast/kernels/triton_conv.py) and the "triton" engine backend.

Where the kernel tests run:
  * on a GPU (torch.cuda available, TRITON_INTERPRET unset): directly, on CUDA tensors, in this process;
  * on a CPU machine: ``test_interpreter_subprocess`` re-runs this file in a child pytest with
    ``TRITON_INTERPRET=1`` (set before triton is imported, and kept out of this process so other test modules
    are unaffected): the same kernel source, interpreted on CPU tensors, on tiny shapes (~3000x slower).
    In that child every kernel test below runs; in the parent they are skipped as "runs in the child".

Tolerance (DESIGN §8, flash-attention style): the kernel's error against a float64 reference is at most twice the
error of torch's own computation in the same dtype (the plain-torch reference op run in that dtype), plus a floor
of a few units of the dtype's rounding error. bfloat16 is not tested in the interpreter (it gets bf16 tl.dot
wrong), only on a GPU.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_GPU = torch.cuda.is_available()
RUN_KERNELS = HAS_TRITON and (INTERPRET or HAS_GPU)
DEVICE = "cuda" if (HAS_GPU and not INTERPRET) else "cpu"
# bf16 tl.dot is wrong in the interpreter; fp16 runs there.
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])

kernel_test = pytest.mark.skipif(
    not RUN_KERNELS,
    reason="no GPU: runs in the TRITON_INTERPRET=1 child process (test_interpreter_subprocess)",
)


# ----------------------------------------------------------------------------------------------------------------
# the CPU-machine driver

@pytest.mark.skipif(INTERPRET, reason="already the interpreter child")
@pytest.mark.skipif(HAS_GPU, reason="a GPU is present: the kernel tests run directly")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
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


def make_problem(B, C_in, C_out, Kin, Kout, H, W, k, sharing, stride=1, padding=1, dilation=1, relu=True,
                 residual=True, bias=True, seed=0, n_in=None, n_out=None, kw=None, group_ids=None):
    """Random compact problem (float32, CPU): per group a random sorted subset of channels, -1 padded."""
    gen = torch.Generator().manual_seed(seed)
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
    weight = torch.randn(C_out, C_in, k, kw, generator=gen) / (C_in * k * kw) ** 0.5
    b = torch.randn(C_out, generator=gen) if bias else None
    kh_eff, kw_eff = dilation * (k - 1) + 1, dilation * (kw - 1) + 1
    Ho = (H + 2 * padding - kh_eff) // stride + 1
    Wo = (W + 2 * padding - kw_eff) // stride + 1
    r = torch.randn(B, Kout, Ho, Wo, generator=gen) if residual else None
    return dict(x=x, in_idx=in_idx, weight=weight, bias=b, out_idx=out_idx, groups=groups, residual=r,
                stride=stride, padding=padding, dilation=dilation, relu=relu)


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


def run_triton(p, dtype=torch.float32):
    from gencnp_fast.kernels.triton_conv import gathered_conv2d_triton

    return gathered_conv2d_triton(**_cast(p, dtype, DEVICE))


def check(p, dtype=torch.float32):
    """Kernel vs the float64 dense oracle, with the dtype-aware bound; padding outputs exactly zero."""
    out = run_triton(p, dtype)
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
def test_conv_matches_fp64(sharing, k, stride, padding, dilation):
    check(make_problem(4, 6, 7, 5, 6, 8, 8, k, sharing, stride, padding, dilation))


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sharing", ["shared", "sample"])
def test_dtypes(dtype, sharing):
    check(make_problem(3, 8, 20, 8, 18, 8, 8, 3, sharing, seed=3), dtype)


@kernel_test
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_epilogue_variants(relu, residual, bias):
    check(make_problem(3, 5, 6, 4, 5, 6, 6, 3, "class", relu=relu, residual=residual, bias=bias, seed=1))


@kernel_test
def test_ragged_tiles_many_m_and_n_tiles():
    """More than one M tile (64 pixels x 2 samples per group) and N tile (Kout 40 > BN) per problem."""
    B = 5
    p = make_problem(B, 9, 45, 9, 40, 8, 8, 3, "class", seed=2, n_out=None)
    check(p)
    p = make_problem(B, 9, 45, 9, 40, 8, 8, 3, "shared", seed=4, n_in=9, n_out=40)
    check(p)


@kernel_test
def test_kin_zero_is_bias_plus_residual():
    p = make_problem(3, 4, 5, 3, 4, 5, 5, 3, "sample", n_in=0, seed=5)
    check(p)
    p2 = make_problem(2, 4, 5, 0, 4, 5, 5, 3, "sample", n_in=0, seed=5)  # Kin == 0: an empty input tensor
    check(p2)


@kernel_test
def test_kout_zero_and_empty_output_groups():
    p = make_problem(3, 4, 5, 3, 0, 5, 5, 3, "sample", seed=6)
    out = run_triton(p)
    assert out.shape == (3, 0, 5, 5)
    check(make_problem(4, 4, 5, 3, 4, 5, 5, 3, "sample", n_out=0, seed=7))


@kernel_test
def test_batch_one_rectangular_kernel_odd_sizes():
    check(make_problem(1, 3, 4, 3, 4, 7, 5, 3, "sample", kw=1, padding=1, seed=8))
    check(make_problem(2, 5, 3, 5, 3, 9, 6, 2, "shared", kw=3, stride=2, padding=0, seed=9))


@kernel_test
def test_arbitrary_group_ids():
    check(make_problem(5, 6, 6, 5, 5, 6, 6, 3, "class", group_ids=[17, 3, 250], seed=10))


@kernel_test
def test_padding_channels_are_never_read():
    """NaN in every padded input channel: a kernel that read (or multiplied) them would produce NaN."""
    p = make_problem(4, 6, 7, 6, 6, 6, 6, 3, "sample", seed=11)
    x = p["x"].clone()
    x[p["in_idx"] < 0] = float("nan")
    p["x"] = x
    out = run_triton(p)
    assert not bool(torch.isnan(out).any())
    clean = dict(p, x=torch.nan_to_num(x, nan=0.0))
    assert rel_err(out, dense_oracle(clean)) <= 1e-5


@kernel_test
def test_linear():
    from gencnp_fast.kernels.triton_conv import gathered_linear_triton

    p = make_problem(6, 30, 20, 24, 18, 1, 1, 1, "class", padding=0, seed=12)
    q = _cast(p, torch.float32, DEVICE)
    out = gathered_linear_triton(q["x"].reshape(6, -1), q["in_idx"], q["weight"].reshape(20, 30), q["bias"],
                                 q["out_idx"], q["groups"], q["residual"].reshape(6, -1), relu=True)
    assert out.shape == (6, 18)
    assert rel_err(out, dense_oracle(p).reshape(6, -1)) <= 1e-5


@kernel_test
def test_bad_inputs_raise():
    from gencnp_fast.kernels.triton_conv import gathered_conv2d_triton

    q = _cast(make_problem(2, 4, 4, 3, 3, 5, 5, 3, "sample"), torch.float32, DEVICE)
    with pytest.raises(TypeError, match="int32"):
        gathered_conv2d_triton(**dict(q, in_idx=q["in_idx"].long()))
    with pytest.raises(TypeError, match="weight"):
        gathered_conv2d_triton(**dict(q, weight=q["weight"].double()))
    with pytest.raises(ValueError, match="larger than"):
        gathered_conv2d_triton(**dict(q, padding=0, dilation=4))
    with pytest.raises(ValueError, match="residual"):
        gathered_conv2d_triton(**dict(q, residual=q["residual"][:, :1]))


# ----------------------------------------------------------------------------------------------------------------
# the whole pathway forward with backend="triton" against the dense masked reference

def _tiny_models():
    from gencnp_fast import models

    return {
        "resnet_basic": lambda: models.ResNet(models.BasicBlock, [1, 1], num_classes=10, width=4, cifar_stem=True),
        "resnet_bottleneck": lambda: models.ResNet(models.Bottleneck, [1, 1], num_classes=6, width=4,
                                                   cifar_stem=True),
        "vgg": lambda: models.VGG(models.make_vgg_features([4, "M", 8, 8, "M", 8], True), num_classes=5,
                                  pool_size=1, hidden=12, feature_channels=8),
    }


@kernel_test
@pytest.mark.parametrize("name", ["resnet_basic", "resnet_bottleneck", "vgg"])
@pytest.mark.parametrize("sharing,density", [("shared", 0.5), ("per_class", 0.25), ("per_sample", 0.5),
                                             ("per_sample", 1.0), ("per_sample", 0.0)])
def test_fast_pathway_forward_triton(name, sharing, density):
    import gencnp_fast as g
    from gencnp_fast import models
    from gencnp_fast.kernels import gpu_backends  # noqa: F401  (registers "triton" if the engine has not yet)

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
    out = g.fast_pathway_forward(model, path, x, backend="triton")
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-4, rel_err(out, ref)


@kernel_test
def test_fast_pathway_forward_triton_mixed_empty_and_full_units():
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
    assert rel_err(g.fast_pathway_forward(model, path, x, backend="triton"), ref) <= 1e-4


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
    jit = tc._gathered_conv2d_kernel.fn
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
