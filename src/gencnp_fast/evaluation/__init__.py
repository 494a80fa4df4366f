"""Evaluation of pathways: metrics (docs/design.md §5), packed pathways, baselines, class-pathway transfer and
reports."""

from .metrics import class_iou, confidence_metrics, density_stats, flatten_pathway, iou_matrix
from .packed import PackedPathways

__all__ = ["class_iou", "confidence_metrics", "density_stats", "flatten_pathway", "iou_matrix", "PackedPathways"]
