"""sparse_rl: train only a small subnetwork of a language model during RL finetuning with TRL."""

from .config import SparseConfig
from .delta import SparseDelta, SparseDeltaConfig
from .discovery import gradient_mask, gradient_mask_from_trainer, mask_from_scores, random_mask
from .hooks import restrict_gradients
from .mask import SubnetworkMask
from .optim import MaskedAdamW
from .reference import SharedReference, use_shared_reference
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
    "gradient_mask",
    "gradient_mask_from_trainer",
    "mask_from_scores",
    "random_mask",
    "restrict_gradients",
    "sparsify",
    "use_shared_reference",
]

__version__ = "0.1.0"
