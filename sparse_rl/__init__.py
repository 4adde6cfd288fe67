"""sparse_rl: train only a small subnetwork of a language model during RL finetuning with TRL."""

from .config import SparseConfig
from .discovery import gradient_mask, gradient_mask_from_trainer, mask_from_scores, random_mask
from .hooks import restrict_gradients
from .mask import SubnetworkMask
from .optim import MaskedAdamW
from .trl import SparseTraining, UnsupportedTrainerSetup, sparsify

__all__ = [
    "MaskedAdamW",
    "SparseConfig",
    "SparseTraining",
    "SubnetworkMask",
    "UnsupportedTrainerSetup",
    "gradient_mask",
    "gradient_mask_from_trainer",
    "mask_from_scores",
    "random_mask",
    "restrict_gradients",
    "sparsify",
]

__version__ = "0.1.0"
