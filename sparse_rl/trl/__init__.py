"""The drop-in for TRL (and plain transformers) trainers: ``sparsify(trainer, SparseConfig(...))``.

- :mod:`.training`: the entry point `sparsify` and :class:`SparseTraining` (what it attached, and its undo);
- :mod:`.refusals`: every setup ``sparsify`` refuses, checked before anything changes;
- :mod:`.patches`: the trainer/model/accelerator attributes it replaces (optimizer factory, checkpoint loaders, log,
  the entropy forward restriction, compact-gradient clipping);
- :mod:`.callbacks`: the ``TrainerCallback``s it adds (mask in every checkpoint, FSDP2 sharding);
- :mod:`.build`: ``build_trainer``, which builds and sparsifies a trainer without ever loading its reference copy.
"""

from .build import build_trainer
from .callbacks import MASK_FILE_NAME
from .refusals import IncompatibleLibraryVersion, UnsupportedTrainerSetup
from .training import SparseTraining, sparsify

__all__ = ["MASK_FILE_NAME", "IncompatibleLibraryVersion", "SparseTraining", "UnsupportedTrainerSetup", "build_trainer",
           "sparsify"]
