"""Make an existing TRL (or plain transformers) trainer train only a subnetwork.

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=..., train_dataset=...)
    sparsify(trainer, SparseConfig(density=0.1))
    trainer.train()

``sparsify`` (1) checks the setup (:mod:`.refusals`, including the private pieces of TRL/transformers/accelerate it
relies on, :mod:`sparse_rl._compat`), (2) picks or loads the mask, (3) installs gradient hooks so every consumer of
``.grad`` (clipping, ``grad_norm``, DDP, accumulation) sees the masked gradient, compact ones where supported, (4)
hands the trainer a factory for :class:`MaskedAdamW`, (5) optionally restricts the loss gradient to high-entropy
tokens, (6) saves the mask into every checkpoint folder and checks it on resume, (7) adds ``sparse/*`` entries to the
training logs, and (8) optionally replaces the reference model by a shared one (:mod:`sparse_rl.reference`). The
patches of (4)-(7) are in :mod:`.patches` and :mod:`.callbacks`; each returns its undo.

Every check runs before anything is changed: a refused ``sparsify`` leaves the trainer and the model as they were.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import Trainer

from .. import _compat
from .._memory import return_freed_memory
from ..config import SparseConfig
from ..discovery import gradient_mask_from_trainer, random_mask
from ..distributed import agree_on_mask
from ..mask import SubnetworkMask
from ..reference import (
    SharedReference,
    check_reference_covers,
    check_shared_reference_possible,
    install_shared_reference,
)
from ..restrict.gradients import GradientRestriction, restrict_gradients
from ..restrict.tokens import HighEntropyTokens
from . import patches
from .callbacks import MASK_FILE_NAME, FSDP2GradientRestriction, add_callback
from .refusals import (
    UnsupportedTrainerSetup,
    entropy_site,
    is_online_dpo,
    refuse_incompatible_libraries,
    refuse_unsupported,
    resolve_compact_grads,
)


@dataclass
class SparseTraining:
    """What ``sparsify`` attached to a trainer; ``remove()`` restores dense training before ``train()``.

    ``compact_grads`` is the resolved setting (``SparseConfig.compact_grads=None`` turns it on where supported)."""

    trainer: Trainer
    mask: SubnetworkMask
    restriction: GradientRestriction
    compact_grads: bool = False
    entropy_tokens: HighEntropyTokens | None = None
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def trained_fraction(self) -> float:
        """Selected entries over all parameters of the model (frozen ones included)."""
        return self.mask.density_of(self.trainer.model)

    def check_checkpoint(self, checkpoint: str | os.PathLike) -> None:
        """Refuse to resume from ``checkpoint`` unless it was saved with this very mask: the compact optimizer state
        in it only lines up with the entries that mask selects."""
        path = os.path.join(checkpoint, MASK_FILE_NAME)
        if not os.path.isfile(path):
            raise UnsupportedTrainerSetup(
                f"checkpoint {checkpoint} has no {MASK_FILE_NAME}: it was not written by a sparsified trainer, so "
                "its optimizer state does not fit MaskedAdamW. Start a new run from its weights (load the model from "
                "that folder) instead of passing resume_from_checkpoint")
        if SubnetworkMask.load(path) != self.mask:
            raise UnsupportedTrainerSetup(
                f"the mask saved in {checkpoint} differs from this trainer's mask, so the saved optimizer state "
                f"belongs to other entries; resume with sparsify(trainer, SparseConfig(mask={path!r}))")

    def remove(self) -> None:
        """Undo ``sparsify``: hooks, frozen parameters, patched methods, callbacks, optimizer factory."""
        if self.trainer.optimizer is not None:
            raise UnsupportedTrainerSetup("remove() must be called before train(): the optimizer already holds the "
                                          "subnetwork's state only; build a new trainer for dense training")
        if isinstance(getattr(self.trainer, "ref_model", None), SharedReference):
            raise UnsupportedTrainerSetup("the trainer's reference copy was freed for a shared reference "
                                          "(shared_reference=True), which only holds the subnetwork's starting values; "
                                          "build a new trainer for dense training")
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self.restriction.remove()
        self.trainer.__dict__.pop("sparse_training", None)


def sparsify(trainer: Trainer, config: SparseConfig | None = None) -> SparseTraining:
    """Restrict ``trainer`` to a subnetwork chosen by ``config``; call after building the trainer, before
    ``trainer.train()``."""
    config = config or SparseConfig()
    if not isinstance(trainer, Trainer):
        raise UnsupportedTrainerSetup(f"sparsify expects a transformers/TRL Trainer, got {type(trainer).__name__}")
    use = _compat.Use(probe=config.mask is None and config.discovery == "gradient",
                      entropy=config.entropy_quantile < 1.0, shared_reference=config.shared_reference)
    refuse_incompatible_libraries(trainer, use)
    refuse_unsupported(trainer)
    site = entropy_site(trainer) if use.entropy else None
    unbound = _unbound_reference(trainer)
    if unbound is not None and not config.shared_reference:
        raise UnsupportedTrainerSetup("the trainer's ref_model is an unbound SharedReference (no reference copy was "
                                      "built), which only a shared reference can fill in; pass "
                                      "SparseConfig(shared_reference=True)")
    if config.shared_reference:
        check_shared_reference_possible(trainer)
    compact = resolve_compact_grads(trainer, config.compact_grads)
    with unbound.standing_in() if unbound is not None else contextlib.nullcontext():
        mask = _resolve_mask(trainer, config)  # a loss probe may call the reference: the untrained policy is it
    # every process trains the same entries: the probe scored the global batch, and every mask is checked to agree
    mask = agree_on_mask(mask, discovered=use.probe)
    check_reference_covers(trainer, mask)  # a SharedReference passed as ref_model= must store every trained entry

    # Nothing below refuses user input: from here on the trainer is changed.
    restriction = restrict_gradients(trainer.model, mask, compact=compact)
    sparse = SparseTraining(trainer=trainer, mask=mask, restriction=restriction, compact_grads=compact)
    sparse._undo.append(patches.hand_over_optimizer(
        trainer, mask, master_weights=config.master_weights, state_bits=config.state_bits,
        stochastic_rounding=config.stochastic_rounding, skip_nonfinite=config.skip_nonfinite_steps))
    if site is not None:
        sparse.entropy_tokens = HighEntropyTokens(config.entropy_quantile)
        if site == "fused":
            sparse._undo.append(patches.restrict_fused_forward(trainer.model, sparse.entropy_tokens))
        else:
            sparse._undo.append(patches.restrict_online_dpo_forward(trainer, sparse.entropy_tokens))
    if compact:  # the trainer's clipping and grad_norm logging read .grad, which is freed
        sparse._undo.append(patches.clip_compact_gradients(trainer.accelerator))
    sparse._undo.append(patches.save_mask_with_model(sparse))
    sparse._undo.append(patches.resume_from_complete_checkpoints(sparse))
    sparse._undo.append(patches.check_mask_on_resume(sparse))
    sparse._undo.append(patches.log_sparse_metrics(sparse))
    if getattr(trainer, "is_fsdp_enabled", False):
        sparse._undo.append(add_callback(sparse, FSDP2GradientRestriction(sparse)))
    trainer.sparse_training = sparse
    if config.shared_reference:
        install_shared_reference(trainer, mask)
    return_freed_memory()  # the probe's buffers, a freed reference copy: otherwise resident for the whole run
    return sparse


def _unbound_reference(trainer: Trainer) -> SharedReference | None:
    reference = getattr(trainer, "ref_model", None)
    return reference if isinstance(reference, SharedReference) and not reference.is_bound else None


def _resolve_mask(trainer: Trainer, config: SparseConfig) -> SubnetworkMask:
    """The mask to train with; reads the model but changes nothing."""
    model = trainer.model
    if config.mask is not None:
        mask = config.mask if isinstance(config.mask, SubnetworkMask) else SubnetworkMask.load(config.mask)
        mask.check_matches(model.named_parameters())
        for name, selection in mask.items():
            if any(pattern in name for pattern in config.exclude) and bool(selection.any()):
                raise UnsupportedTrainerSetup(f"the mask selects entries of {name!r}, which exclude={config.exclude} "
                                              "freezes; drop the pattern from exclude or the entries from the mask")
    elif config.discovery == "random":
        mask = random_mask(model, config.density, seed=config.seed, exclude=config.exclude)
    else:
        if is_online_dpo(trainer):
            raise UnsupportedTrainerSetup("gradient discovery probes trainer.compute_loss, which OnlineDPOTrainer does "
                                          "not use (its loss lives in training_step); use discovery='random' or "
                                          "pass a mask")
        mask = gradient_mask_from_trainer(trainer, config.density, config.probe, exclude=config.exclude)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    frozen = [name for name, selection in mask.items() if name not in trainable and bool(selection.any())]
    if frozen:
        raise UnsupportedTrainerSetup(
            f"the mask selects entries of {frozen[0]!r} ({len(frozen)} frozen tensor(s) in all), which has "
            "requires_grad=False, so they would never train and the trained fraction would be overstated; unfreeze "
            "it, or drop it from the mask")
    if not any(bool(selection.any()) for name, selection in mask.items() if name in trainable):
        raise UnsupportedTrainerSetup("the mask selects no entry of any trainable parameter, so nothing would be "
                                      "trained; check the mask, exclude and which parameters require grad")
    return mask
