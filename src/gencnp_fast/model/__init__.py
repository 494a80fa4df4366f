"""The target model as the engine sees it: units, pathways (masks) and the reference forward."""

from .pathway import MaskLike, Pathway, normalize_masks
from .reference import capture_units, reference_pathway_forward, soft_pathway_forward
from .units import Unit, UnsupportedModelError, pathway_units

__all__ = [
    "MaskLike",
    "Pathway",
    "Unit",
    "UnsupportedModelError",
    "capture_units",
    "normalize_masks",
    "pathway_units",
    "reference_pathway_forward",
    "soft_pathway_forward",
]
