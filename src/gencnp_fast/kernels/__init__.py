"""The gathered convolution's contract and its kernels outside the compiled extension.

    contract.py      the op's contract in Python: one argument check (fake kernels, Triton launcher), the problem
                     list helper, the plain-torch implementation (the "torch" backend, the tests' oracle)
    triton_conv.py   Triton implicit-GEMM kernel, registered as the op gencnp_fast::gathered_conv2d_triton
                     (imports triton: loaded lazily by gencnp_fast.plan.backends)

The CPU and CUDA kernels live in ``csrc/cpu/`` and ``csrc/cuda/`` and are part of the compiled extension
``gencnp_fast._C`` (``torch.ops.gencnp_fast.gathered_conv2d``). Nothing here imports triton at package import time.
"""
