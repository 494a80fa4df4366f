"""The Triton cases of the op, engine and Triton-kernel tests on a CPU machine: run in a child pytest with
``TRITON_INTERPRET=1``.

The interpreter must be chosen before triton is imported, and it must stay out of this process (other test modules
import triton compiled), hence the child process: there the ``backend`` fixture (tests/conftest.py) runs ``triton``
on CPU tensors and skips the other backends, and the test files keep the interpreted cases tiny (~3000x slower than
compiled code). On a machine with a GPU the triton cases run directly in the parent and this driver is skipped.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import HAS_GPU, HAS_TRITON, INTERPRET, extension_loads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["tests/test_ops.py", "tests/test_engine.py", "tests/test_triton_kernel.py"]


def _interpreter_loop_bound_bug() -> bool:
    """Triton < 3.7's interpreter turns a loop bound loaded from memory into a Python int with ``int()`` of a
    1-element array, which NumPy 2 refuses (TypeError); 3.7 squeezes it first. Compiled code is unaffected."""
    if not HAS_TRITON:
        return False
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
@pytest.mark.skipif(HAS_GPU, reason="a GPU is present: the triton cases run directly in the parent")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(not extension_loads(), reason="the compiled extension is not built: the triton cases would "
                    "all be skipped")
@pytest.mark.skipif(_interpreter_loop_bound_bug(), reason="this triton's interpreter cannot run the kernel under "
                    "NumPy 2 (int() of a 1-element loop bound; fixed in triton 3.7): tests/test_triton_kernel.py"
                    "::test_aot_compile_sm90 still compiles the kernel")
def test_triton_cases_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *FILES, "-k", "triton"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    tail = out[-6000:]
    print(tail)
    assert proc.returncode == 0, f"the interpreter run failed (rc={proc.returncode}):\n{tail}"
    assert " passed" in out and " failed" not in out, tail
