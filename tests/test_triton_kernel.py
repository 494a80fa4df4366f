"""The Triton backend beyond the op's values (those are tests/test_ops.py, for every backend): the tile rule and the
autotuner's pruning, the autotuned launch, the engine registration, and ahead-of-time compilation for sm_90.

The autotuned launch runs where the Triton kernel runs (a GPU, or the ``TRITON_INTERPRET=1`` child of
tests/test_triton_interpreter.py); the rule, the registration and the AOT compile are plain Python / compiler calls
that run in the parent process on any machine with triton installed.
"""
from __future__ import annotations

import os

import pytest
import torch

from conftest import (HAS_TRITON, INTERPRET, assert_close_to_fp64, dense_oracle, extension_loads, make_problem,
                      skip_reason)
from gencnp_fast.kernels.contract import gathered_conv2d_reference

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
parent_only = pytest.mark.skipif(INTERPRET, reason="checked in the parent process")


# ---------------------------------------------------------------------------------------------------------------
# the tile rule and the autotuner's pruning (plain Python)

@parent_only
@needs_triton
def test_tile_rule_and_pruning(monkeypatch):
    from gencnp_fast.kernels import triton_conv as tc

    def tile(c):
        return c.kwargs["BM"], c.kwargs["BN"]

    def key(c):
        return c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"], c.num_warps, c.num_stages

    # rule: 16-row tiles for small M, 32-column tiles for narrow layers, 128x128 for large maps x wide layers
    assert tile(tc.heuristic_config(1, 4, 512))[0] == 16  # a 2x2 map, one sample
    assert tile(tc.heuristic_config(1, 1, 10)) == (16, 32)  # a linear layer
    assert tile(tc.heuristic_config(64, 1024, 24))[1] == 32
    assert tile(tc.heuristic_config(64, 50176, 256)) == (128, 128)
    assert tile(tc.heuristic_config(1, 196, 128)) == (64, 64)
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
    monkeypatch.setenv(tc.AUTOTUNE_ENV, "0")
    assert not tc.autotune_enabled()
    monkeypatch.setenv(tc.AUTOTUNE_ENV, "1")
    assert tc.autotune_enabled() == (not tc.INTERPRET)


# ---------------------------------------------------------------------------------------------------------------
# the autotuned launch (the default outside the test suite)

def test_triton_autotuned_path(monkeypatch):
    """The autotuned launch gives the rule-picked launch's result, within the tolerance rule of the float64 oracle:
    on a GPU it times the candidates that fit each shape; in the interpreter it has the one configuration."""
    reason = skip_reason("triton")
    if reason:
        pytest.skip(f"triton: {reason}")
    from gencnp_fast.kernels import triton_conv as tc

    dev = "cuda" if not INTERPRET else "cpu"
    op = torch.ops.gencnp_fast.gathered_conv2d_triton
    for p in (make_problem(3, 9, 40, 9, 36, 8, 8, 3, "sample", seed=13, scale_weight=True),
              make_problem(4, 16, 24, 16, 20, 2, 2, 3, "shared", seed=14, scale_weight=True)):
        args = [a.to(dev) if isinstance(a, torch.Tensor) else a for a in
                (p["x"], p["in_idx"], p["weight"], p["bias"], p["out_idx"], p["sample_group"], p["residual"])]
        lists = [[p[k]] * 2 for k in ("stride", "padding", "dilation")]
        monkeypatch.setenv(tc.AUTOTUNE_ENV, "0")
        by_rule = op(*args, *lists, p["relu"])
        monkeypatch.setenv(tc.AUTOTUNE_ENV, "1")
        assert tc.autotune_enabled() == (not INTERPRET)
        tuned = op(*args, *lists, p["relu"])
        assert_close_to_fp64(tuned, gathered_conv2d_reference(**p), dense_oracle(p), "autotuned")
        assert_close_to_fp64(by_rule, gathered_conv2d_reference(**p), dense_oracle(p), "by rule")
        if INTERPRET:
            assert torch.equal(tuned, by_rule)  # the one configuration


# ---------------------------------------------------------------------------------------------------------------
# the engine's registration of the backend

@pytest.mark.skipif(not extension_loads(), reason="the compiled extension is not built")
def test_triton_backend_registration():
    """Known to the engine; it claims CPU tensors only under the interpreter."""
    from gencnp_fast.plan.backends import BACKENDS, available_backends

    devices = BACKENDS["triton"].dtypes
    assert "cuda" in devices
    assert ("cpu" in devices) == INTERPRET
    if not INTERPRET:
        assert "triton" not in available_backends("cpu")
    elif HAS_TRITON:
        assert "triton" in available_backends("cpu")
        assert torch.bfloat16 in devices["cpu"]


# ---------------------------------------------------------------------------------------------------------------
# ahead-of-time compilation for an H100 (sm_90) without a GPU: the real (non-interpreted) code path of the kernel,
# through Triton's MLIR pipeline and ptxas, for every dtype, autotune configuration family and epilogue variant

def _ptxas_available() -> bool:
    if not HAS_TRITON:
        return False
    import importlib.util

    base = os.path.join(os.path.dirname(importlib.util.find_spec("triton").origin), "backends", "nvidia", "bin",
                        "ptxas")
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
