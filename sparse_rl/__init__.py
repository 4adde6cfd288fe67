"""sparse_rl: train only a small subnetwork of a language model during RL finetuning with TRL.

The public surface is the seven names below; discovery, analysis, gradient restriction and reference-model helpers
stay importable from their modules (``sparse_rl.discovery``, ``sparse_rl.analysis``, ``sparse_rl.restrict``,
``sparse_rl.reference``, ...). Names are imported on first use, so ``from sparse_rl import MaskedAdamW`` does not
import TRL or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import SparseConfig
    from .delta import SparseDelta
    from .mask import SubnetworkMask
    from .optim import MaskedAdamW
    from .trl import SparseTraining, UnsupportedTrainerSetup, sparsify

_EXPORTS = {
    "MaskedAdamW": ".optim",
    "SparseConfig": ".config",
    "SparseDelta": ".delta",
    "SparseTraining": ".trl",
    "SubnetworkMask": ".mask",
    "UnsupportedTrainerSetup": ".trl",
    "sparsify": ".trl",
}

__all__ = ["MaskedAdamW", "SparseConfig", "SparseDelta", "SparseTraining", "SubnetworkMask",
           "UnsupportedTrainerSetup", "sparsify"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sparse_rl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
