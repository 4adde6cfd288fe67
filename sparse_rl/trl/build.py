"""Build a sparsified TRL trainer whose reference copy is never loaded.

``sparsify(trainer, SparseConfig(shared_reference=True))`` frees the reference copy TRL built in the trainer's
constructor, but that copy has already set the process's peak memory (a whole second model: 14 GB for a 7B model in
bf16). :func:`build_trainer` builds the trainer without it::

    trainer = build_trainer(GRPOTrainer, SparseConfig(density=0.1, shared_reference=True),
                            model=model, reward_funcs=reward, args=GRPOConfig(beta=0.04, ...), train_dataset=ds)
    trainer.train()

The trainer gets an *unbound* :class:`~sparse_rl.reference.SharedReference` of the policy as its reference model,
which stores nothing; ``sparsify`` then chooses the mask and binds the reference to it (the starting values of the
selected entries), before any training step. How the trainer gets it:

- DPOTrainer and KTOTrainer take ``ref_model=``: it is passed there (TRL's own API).
- GRPOTrainer and RLOOTrainer (TRL 1.16) take no ``ref_model=`` and build theirs with
  ``create_model_from_path(get_config_model_id(model.config), ...)``; during the constructor that function of the
  trainer's module returns the unbound reference for the policy's checkpoint (and loads anything else as before).
  This private piece is checked up front (:mod:`sparse_rl._compat`).

TRL then treats it like any reference model: ``disable_dropout_in_model`` (no submodules), ``add_fused_lm_head``
and ``accelerator.prepare_model(..., evaluation_mode=True)`` patch its instance ``forward``, which the shared
reference ignores (the policy carries the same patches). Setups without a reference model, or whose reference is not
the starting model, are refused before the trainer is built: PEFT, ``beta=0.0`` (GRPO/RLOO), ``sync_ref_model``,
``precompute_ref_log_probs``, FSDP, GRPO's ``cast_lm_head_to_fp32`` and a ``ref_model=`` of the caller's own.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from transformers import Trainer

from .. import _compat
from ..config import SparseConfig
from ..reference import SharedReference
from .refusals import IncompatibleLibraryVersion, UnsupportedTrainerSetup
from .training import sparsify


def build_trainer(trainer_cls: type[Trainer], config: SparseConfig, /, **trainer_kwargs) -> Trainer:
    """``trainer_cls(**trainer_kwargs)``, sparsified with ``config`` (``trainer.sparse_training``); with
    ``config.shared_reference`` no reference copy is ever built. ``model`` must be a loaded model."""
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise UnsupportedTrainerSetup(f"build_trainer expects a transformers/TRL Trainer class, got {trainer_cls!r}")
    if not config.shared_reference:
        trainer = trainer_cls(**trainer_kwargs)
        sparsify(trainer, config)
        return trainer

    route = _check_never_built_reference(trainer_cls, trainer_kwargs)
    model = trainer_kwargs["model"]
    reference = SharedReference(model)
    if route == "ref_model":
        trainer = trainer_cls(**trainer_kwargs, ref_model=reference)
    else:
        with _reference_from(route, model, reference):
            trainer = trainer_cls(**trainer_kwargs)
    if trainer.ref_model is not reference:
        raise IncompatibleLibraryVersion(
            f"{trainer_cls.__name__} did not take the shared reference as its reference model (its ref_model is "
            f"{type(trainer.ref_model).__name__}); this TRL version builds its reference differently. Build the "
            "trainer yourself and call sparsify(trainer, SparseConfig(shared_reference=True)), which frees the copy")
    sparsify(trainer, config)
    return trainer


def _check_never_built_reference(trainer_cls: type[Trainer], kwargs: dict):
    """Refuse, before the trainer exists, what an unbound reference cannot stand for; returns how the trainer gets it:
    ``"ref_model"`` or the module whose ``create_model_from_path`` builds the copy."""
    name = trainer_cls.__name__
    model = kwargs.get("model")
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedTrainerSetup(
            f"build_trainer with shared_reference needs the policy as a loaded model (got {type(model).__name__}): "
            "the shared reference is that very model; load it first, e.g. AutoModelForCausalLM.from_pretrained(...)")
    if hasattr(model, "peft_config") or kwargs.get("peft_config") is not None:
        raise UnsupportedTrainerSetup("PEFT models get their reference by disabling the adapter; a shared reference "
                                      "is for subnetwork training of the full model")
    if kwargs.get("ref_model") is not None:
        raise UnsupportedTrainerSetup("build_trainer with shared_reference builds the reference itself; drop "
                                      "ref_model= (or pass it and call sparsify on a trainer you built)")
    args = kwargs.get("args")
    if args is None:
        raise UnsupportedTrainerSetup(f"pass args= ({name}'s config): build_trainer checks its reference options "
                                      "(beta, sync_ref_model, precompute_ref_log_probs) before building the trainer")
    if getattr(args, "sync_ref_model", False):
        raise UnsupportedTrainerSetup("sync_ref_model=True moves the reference towards the policy, so it is no "
                                      "longer the starting model a shared reference stores; set sync_ref_model=False")
    if getattr(args, "precompute_ref_log_probs", False):
        raise UnsupportedTrainerSetup("precompute_ref_log_probs=True scores the dataset with a reference model "
                                      "before training, and no shared reference exists before the mask is chosen; "
                                      "set precompute_ref_log_probs=False")
    if getattr(args, "fsdp", None):
        raise UnsupportedTrainerSetup("shared_reference swaps whole parameters of the policy, but under FSDP each "
                                      "process holds only a shard of them; keep TRL's reference copy with FSDP2")
    if "ref_model" in inspect.signature(trainer_cls.__init__).parameters:
        return "ref_model"
    if getattr(args, "beta", None) == 0.0:
        raise UnsupportedTrainerSetup(f"{name} with beta=0.0 keeps no reference model, so there is nothing to share; "
                                      "use shared_reference=False")
    if getattr(args, "cast_lm_head_to_fp32", False):
        raise UnsupportedTrainerSetup("cast_lm_head_to_fp32=True replaces the reference model's lm_head, which a "
                                      "shared reference does not have (it runs the policy's); set it to False or "
                                      "build the trainer yourself and call sparsify(trainer, SparseConfig("
                                      "shared_reference=True))")
    module = _compat.reference_construction_module(trainer_cls)
    if module is None:
        missing = [r for r in _compat.RELIANCES if r.applies(trainer_cls, _compat.Use(never_built_reference=True))]
        if not missing:
            raise UnsupportedTrainerSetup(
                f"{name} takes no ref_model= and is not a trainer whose reference build_trainer knows how to skip "
                "(DPOTrainer, KTOTrainer, GRPOTrainer, RLOOTrainer); build it and call sparsify(trainer, "
                "SparseConfig(shared_reference=True))")
        raise IncompatibleLibraryVersion(_compat.describe_missing(missing))
    return module


@contextlib.contextmanager
def _reference_from(module, model: torch.nn.Module, reference: SharedReference):
    """While the trainer is built, ``module.create_model_from_path`` returns ``reference`` for the policy's own
    checkpoint, once; every other call (the policy or a reward model given by name) loads as before."""
    original = module.create_model_from_path
    policy_id = getattr(model.config, "_name_or_path", "")
    handed = []

    def create_model_from_path(model_id, *args, **kwargs):
        if model_id == policy_id and not handed:
            handed.append(model_id)
            return reference
        return original(model_id, *args, **kwargs)

    module.create_model_from_path = create_model_from_path
    try:
        yield
    finally:
        module.create_model_from_path = original
