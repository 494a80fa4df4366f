"""GEN-CNP pathway generator (our reconstruction, docs/design.md §4).

    RFE (rfe.py)  Recursive Feature Embedders: per-unit embeddings + a GRU shallow → deep
    PDN (pdn.py)  Pathway Distillation Network: class-relevant code c, distilled head, supervised-contrastive term
    RPD (rpd.py)  Recursive Pathway Decoders: GRU deep → shallow, per-unit channel scores in (0, 1)
    DAQ (daq.py)  Distance-Aware Quantization (1-bit): soft rounding in training, hard at inference
    GenCNP (gencnp.py)  the module; train.py the training loop
"""

from .daq import DistanceAwareQuantizer
from .gencnp import GenCNP, GenCNPOutput, read_checkpoint
from .pdn import PathwayDistillationNetwork, distill_kl, supervised_contrastive
from .rfe import RecursiveFeatureEmbedder, UnitEmbedding
from .rpd import RecursivePathwayDecoder
from .train import TrainConfig, gencnp_loss, seed_everything, train_gencnp, validate

__all__ = [
    "DistanceAwareQuantizer",
    "GenCNP",
    "GenCNPOutput",
    "PathwayDistillationNetwork",
    "RecursiveFeatureEmbedder",
    "RecursivePathwayDecoder",
    "TrainConfig",
    "UnitEmbedding",
    "distill_kl",
    "gencnp_loss",
    "read_checkpoint",
    "seed_everything",
    "supervised_contrastive",
    "train_gencnp",
    "validate",
]
