"""The ``TrainerCallback`` ``sparsify`` adds: the gradient masking moved onto FSDP2's sharded parameters once
``train()`` has prepared them. The installer returns its undo. (The mask reaches checkpoints through
:func:`sparse_rl.trl.patches.save_mask_with_model`, before Trainer rotates old checkpoints out, which a callback's
``on_save`` cannot do.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from transformers import TrainerCallback

from ..optim import unwrap_optimizer
from ..restrict.sharded import is_sharded, restrict_sharded_gradients

if TYPE_CHECKING:
    from .training import SparseTraining

MASK_FILE_NAME = "sparse_mask.safetensors"


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
