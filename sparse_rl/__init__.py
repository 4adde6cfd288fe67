"""sparse_rl: train only a small subnetwork of a language model during RL finetuning with TRL."""

from .analysis import analyze_update, mask_overlap, precision_control
from .config import SparseConfig
from .delta import SparseDelta, SparseDeltaConfig
from .discovery import (
    diff_mask,
    gradient_mask,
    gradient_mask_from_trainer,
    magnitude_mask,
    mask_from_scores,
    random_mask,
)
from .mask import SubnetworkMask
from .optim import MaskedAdamW
from .reference import SharedReference, use_shared_reference
from .restrict import restrict_gradients
from .trl import SparseTraining, UnsupportedTrainerSetup, sparsify

__all__ = [
    "MaskedAdamW",
    "SharedReference",
    "SparseConfig",
    "SparseDelta",
    "SparseDeltaConfig",
    "SparseTraining",
    "SubnetworkMask",
    "UnsupportedTrainerSetup",
    "analyze_update",
    "diff_mask",
    "gradient_mask",
    "gradient_mask_from_trainer",
    "magnitude_mask",
    "mask_from_scores",
    "mask_overlap",
    "precision_control",
    "random_mask",
    "restrict_gradients",
    "sparsify",
    "use_shared_reference",
]

__version__ = "0.1.0"
