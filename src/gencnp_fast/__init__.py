"""gencnp_fast: neural-pathway explanations of CNN classifiers (GEN-CNP), run at sparse-compute speed.

Public API:
    pathway_units(model, example_input)        the model's units (activation calls) in execution order
    reference_pathway_forward(model, mask, x)  the dense masked model (the oracle)
    fast_pathway_forward(model, mask, x)       the same logits with every pruned channel skipped
    invalidate(model)                          forget the engine's caches of a model (after edits through .data)
    Pathway                                    per-unit channel masks
    tune_allocator()                           glibc malloc settings for fast CPU inference (process-wide)
"""

from .model import (
    MaskLike,
    Pathway,
    Unit,
    UnsupportedModelError,
    capture_units,
    pathway_units,
    reference_pathway_forward,
    soft_pathway_forward,
)
from .model.guards import invalidate
from .plan import available_backends, fast_pathway_forward, pathway_flops
from .runtime import tune_allocator

__version__ = "0.1.0"

__all__ = [
    "MaskLike",
    "Pathway",
    "Unit",
    "UnsupportedModelError",
    "available_backends",
    "capture_units",
    "fast_pathway_forward",
    "invalidate",
    "pathway_flops",
    "pathway_units",
    "reference_pathway_forward",
    "soft_pathway_forward",
    "tune_allocator",
]
