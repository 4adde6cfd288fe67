"""The ``TrainerCallback``s ``sparsify`` adds: the mask saved into every checkpoint folder, and the gradient masking
moved onto FSDP2's sharded parameters once ``train()`` has prepared them. Each installer returns its undo."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..optim import unwrap_optimizer
from ..restrict.sharded import is_sharded, restrict_sharded_gradients

if TYPE_CHECKING:
    from .sparsify import SparseTraining

MASK_FILE_NAME = "sparse_mask.safetensors"


class SparseCheckpointCallback(TrainerCallback):
    """Writes the mask as ``sparse_mask.safetensors`` into every checkpoint folder (the compact optimizer state
    already goes into ``optimizer.pt`` through ``MaskedAdamW.state_dict``)."""

    def __init__(self, sparse: SparseTraining):
        self.sparse = sparse

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            warnings.warn(f"checkpoint folder {folder} not found; the sparse mask was not saved with it",
                          stacklevel=2)
            return
        self.sparse.mask.save(os.path.join(folder, MASK_FILE_NAME))


class FSDP2GradientRestriction(TrainerCallback):
    """Moves the gradient masking onto the sharded parameters once accelerate's FSDP2 ``prepare`` has replaced the
    originals (``on_train_begin`` runs after it): the hooks ``sparsify`` installed stay on the replaced tensors, and
    FSDP2 writes the sharded gradients with a reduce-scatter, not through autograd."""

    def __init__(self, sparse: SparseTraining):
        self.sparse = sparse
        self.installed = False

    def on_train_begin(self, args, state, control, **kwargs):
        if self.installed:
            return
        optimizer = unwrap_optimizer(self.sparse.trainer.optimizer)
        named = [(n, p) for group in optimizer.param_groups for n, p in zip(group["param_names"], group["params"])]
        restriction = self.sparse.restriction
        if not any(is_sharded(p) for _, p in named):
            return
        for handle in restriction.handles:
            handle.remove()
        restriction.handles = restrict_sharded_gradients(named, self.sparse.mask)
        self.installed = True


def add_callback(sparse: SparseTraining, callback: TrainerCallback) -> Callable[[], None]:
    sparse.trainer.add_callback(callback)
    return lambda: sparse.trainer.remove_callback(callback)
