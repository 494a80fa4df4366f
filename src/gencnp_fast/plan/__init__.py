"""The engine: a model compiled once into a plan over compacted activations, run with every pruned channel skipped.

    sets.py         channel-set references (which channels a compacted tensor stores)
    steps.py        the plan's steps and the Plan
    lowering.py     the plan compiler: one lowering function per supported layer type
    cache.py        the plan cache (per model, input shape, dtype, device, masked units; weight fingerprint)
    indices.py      the run's index planning (one call into the compiled planner per forward)
    interpreter.py  runs a plan's steps with a conv backend
    backends.py     the kernel backends and how "auto" picks one
    cost.py         FLOP and byte counts of a pathway (ideal speedups)
    engine.py       fast_pathway_forward, dense_capture
"""

from .backends import available_backends
from .cache import get_plan
from .cost import pathway_flops
from .engine import dense_capture, fast_pathway_forward

__all__ = ["available_backends", "dense_capture", "fast_pathway_forward", "get_plan", "pathway_flops"]
