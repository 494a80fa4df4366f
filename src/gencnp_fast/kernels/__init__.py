"""GPU kernels of the gathered convolution (the ``"triton"`` and ``"cuda"`` backends of ``fast_pathway_forward``).

    triton_conv.py   Triton implicit-GEMM gathered conv / linear (imports triton: loaded lazily)
    gpu_backends.py  registers the "triton" and "cuda" backends with gencnp_fast.plan.engine

The CUDA kernels themselves live in ``csrc/cuda/`` and are part of the compiled extension ``gencnp_fast._C``
(``torch.ops.gencnp_fast.gathered_conv2d`` dispatches to them for CUDA tensors).
Nothing here imports triton at package import time.
"""
