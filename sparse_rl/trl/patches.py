"""Attributes ``sparsify`` replaces on the trainer, its model and its accelerator; each installer returns its undo.

- ``trainer.optimizer_cls_and_kwargs``: a factory for :class:`MaskedAdamW` (transformers calls a non-Optimizer
  factory with the model, which gives the optimizer the parameter names);
- ``accelerator.clip_grad_norm_`` with compact gradients (the Trainer clips and logs ``grad_norm`` through it);
- ``model.forward`` (TRL's fused LM-head forward) or ``OnlineDPOTrainer._forward`` for the high-entropy token
  restriction (:mod:`sparse_rl.restrict.tokens` builds the replacements);
- ``trainer._load_from_checkpoint`` / ``trainer._load_optimizer_and_scheduler``: check the checkpoint's mask on resume;
- ``trainer.save_model``: writes the mask beside the weights, so a checkpoint holds it before old ones are rotated out;
- ``trainer.train``: ``resume_from_checkpoint=True`` resumes from the newest *complete* checkpoint;
- ``trainer.log``: adds ``sparse/*`` entries to the training logs.

The private pieces among them are listed in :mod:`sparse_rl._compat`, which ``sparsify`` checks first.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..mask import SubnetworkMask
from ..optim import MaskedAdamW, unwrap_optimizer
from ..restrict import compact as compact_grad
from ..restrict.tokens import HighEntropyTokens, restricted_fused_forward, restricted_online_dpo_forward
from .callbacks import MASK_FILE_NAME
from .refusals import UnsupportedTrainerSetup

if TYPE_CHECKING:
    from .training import SparseTraining


def patch_attribute(obj: object, name: str, value: object) -> Callable[[], None]:
    """Set ``obj.name`` on the instance; the returned callable restores what the instance had before."""
    had_own = name in obj.__dict__
    previous = obj.__dict__.get(name)
    setattr(obj, name, value)

    def undo() -> None:
        if obj.__dict__.get(name) is not value:
            warnings.warn(f"{type(obj).__name__}.{name} was patched again after sparsify; leaving it in place",
                          stacklevel=3)
            return
        if had_own:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)

    return undo


# ---------------------------------------------------------------------------------------------- optimizer
class MaskedAdamWFactory:
    """Called by ``Trainer.create_optimizer`` as ``MaskedAdamWFactory()(model, **kwargs)``."""

    def __call__(self, model: torch.nn.Module, *, mask: SubnetworkMask, trainer: Trainer, master_weights: bool,
                 state_bits: int = 32, stochastic_rounding: bool = False, skip_nonfinite: bool = False):
        args = trainer.args
        decay = set(trainer.get_decay_parameter_names(model))
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in trained if n in decay], "param_names": [n for n, _ in trained if n in decay],
             "weight_decay": args.weight_decay},
            {"params": [p for n, p in trained if n not in decay],
             "param_names": [n for n, _ in trained if n not in decay], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        return MaskedAdamW(groups, mask, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           eps=args.adam_epsilon, master_weights=master_weights, state_bits=state_bits,
                           stochastic_rounding=stochastic_rounding, seed=args.seed, skip_nonfinite=skip_nonfinite)


def hand_over_optimizer(trainer: Trainer, mask: SubnetworkMask, *, master_weights: bool, state_bits: int,
                        stochastic_rounding: bool, skip_nonfinite: bool = False) -> Callable[[], None]:
    trainer.optimizer_cls_and_kwargs = (
        MaskedAdamWFactory,
        {"mask": mask, "trainer": trainer, "master_weights": master_weights, "state_bits": state_bits,
         "stochastic_rounding": stochastic_rounding, "skip_nonfinite": skip_nonfinite},
    )

    def undo() -> None:
        trainer.optimizer_cls_and_kwargs = None

    return undo


def clip_compact_gradients(accelerator) -> Callable[[], None]:
    """Route ``Accelerator.clip_grad_norm_`` (what the Trainer calls to clip and to log grad_norm) to compact
    gradients: the dense ``.grad`` it would read is freed during backward."""

    def clip_grad_norm_(parameters, max_norm, norm_type=2):
        accelerator.unscale_gradients()  # a no-op without a loss scaler (fp16 is refused)
        return compact_grad.clip_grad_norm_(parameters, max_norm, norm_type)

    return patch_attribute(accelerator, "clip_grad_norm_", clip_grad_norm_)


# ---------------------------------------------------------------------------------------------- entropy
def restrict_fused_forward(model: torch.nn.Module, tokens: HighEntropyTokens) -> Callable[[], None]:
    """Wrap the fused LM-head forward TRL patched onto ``model`` so only the tokens ``tokens`` selects pass a
    gradient (see :mod:`sparse_rl.restrict.tokens`); returns the undo."""
    return patch_attribute(model, "forward", restricted_fused_forward(model, tokens))


def restrict_online_dpo_forward(trainer: Trainer, tokens: HighEntropyTokens) -> Callable[[], None]:
    """Wrap ``OnlineDPOTrainer._forward`` the same way; returns the undo."""
    return patch_attribute(trainer, "_forward", restricted_online_dpo_forward(trainer, tokens))


# ---------------------------------------------------------------------------------------------- checkpoints
def save_mask_with_model(sparse: SparseTraining) -> Callable[[], None]:
    """Write the mask into every folder ``trainer.save_model`` writes, right after the weights. ``Trainer`` saves a
    checkpoint's weights first and ``trainer_state.json`` last, then deletes old checkpoints (``save_total_limit``),
    so a checkpoint is complete, mask included, before any older one is removed; a callback's ``on_save`` runs only
    after the rotation."""
    trainer = sparse.trainer
    save_model = trainer.save_model

    def wrapped_save_model(output_dir: str | None = None, *args, **kwargs):
        result = save_model(output_dir, *args, **kwargs)
        if trainer.args.should_save:
            folder = output_dir if output_dir is not None else trainer.args.output_dir
            os.makedirs(folder, exist_ok=True)
            sparse.mask.save(os.path.join(folder, MASK_FILE_NAME))
        return result

    return patch_attribute(trainer, "save_model", wrapped_save_model)


def resume_from_complete_checkpoints(sparse: SparseTraining) -> Callable[[], None]:
    """Make ``train(resume_from_checkpoint=True)`` pick the newest *complete* checkpoint (Trainer's own choice is the
    highest-numbered folder, even one whose save was interrupted), saying which it skipped; an explicit path to an
    interrupted save is refused with the last complete checkpoint named."""
    trainer = sparse.trainer
    train = trainer.train

    def wrapped_train(resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(trainer.args.output_dir)
        elif resume_from_checkpoint not in (None, False):
            folder = os.fspath(resume_from_checkpoint)
            if os.path.isdir(folder) and not is_complete_checkpoint(folder):
                last = last_complete_checkpoint(os.path.dirname(os.path.abspath(folder)), quiet=True)
                advice = f"the last complete one there is {last}: resume from it" if last else "no complete one is left"
                raise UnsupportedTrainerSetup(f"checkpoint {folder} is incomplete: its save was interrupted (no "
                                              f"{TRAINER_STATE_NAME}, which Trainer writes last); {advice}")
        return train(resume_from_checkpoint, *args, **kwargs)

    return patch_attribute(trainer, "train", wrapped_train)


def is_complete_checkpoint(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME))


def last_complete_checkpoint(output_dir: str, quiet: bool = False) -> str | None:
    """The highest-numbered ``checkpoint-N`` folder of ``output_dir`` whose save finished; warns about newer ones
    that did not. Raises like ``Trainer`` when ``output_dir`` holds no checkpoint at all."""
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    found = sorted(((int(m.group(1)), os.path.join(output_dir, name)) for name in os.listdir(output_dir)
                    if (m := pattern.match(name)) and os.path.isdir(os.path.join(output_dir, name))), reverse=True)
    if not found:
        if quiet:
            return None
        raise ValueError(f"No valid checkpoint found in output directory ({output_dir})")
    interrupted = []
    for _, folder in found:
        if is_complete_checkpoint(folder):
            if interrupted and not quiet:
                warnings.warn(f"skipping {', '.join(interrupted)}: its save was interrupted (no {TRAINER_STATE_NAME}); "
                              f"resuming from {folder}, the last complete checkpoint", stacklevel=3)
            return folder
        interrupted.append(folder)
    if quiet:
        return None
    raise UnsupportedTrainerSetup(f"every checkpoint in {output_dir} is incomplete (interrupted saves: "
                                  f"{', '.join(interrupted)}); start a new run")


def check_mask_on_resume(sparse: SparseTraining) -> Callable[[], None]:
    """Check the checkpoint's mask before Trainer loads its weights and before it loads the optimizer state."""
    trainer = sparse.trainer
    load_weights, load_optimizer = trainer._load_from_checkpoint, trainer._load_optimizer_and_scheduler

    def _load_from_checkpoint(resume_from_checkpoint, *args, **kwargs):
        sparse.check_checkpoint(resume_from_checkpoint)
        return load_weights(resume_from_checkpoint, *args, **kwargs)

    def _load_optimizer_and_scheduler(checkpoint):
        if checkpoint is not None:
            sparse.check_checkpoint(checkpoint)
        return load_optimizer(checkpoint)

    undo_weights = patch_attribute(trainer, "_load_from_checkpoint", _load_from_checkpoint)
    undo_optimizer = patch_attribute(trainer, "_load_optimizer_and_scheduler", _load_optimizer_and_scheduler)
    return lambda: (undo_optimizer(), undo_weights())


# ---------------------------------------------------------------------------------------------- logging
def log_sparse_metrics(sparse: SparseTraining) -> Callable[[], None]:
    """Wrap ``trainer.log`` so every training log carries ``sparse/*`` entries:

    - ``trained_fraction``: selected entries over all parameters;
    - ``optimizer_state_bytes``: ``MaskedAdamW.state_bytes()`` (moments, master copies, indices);
    - ``skipped_steps`` with ``skip_nonfinite_steps``: optimizer steps skipped so far for non-finite gradients;
    - ``masked_grad_norm``: Trainer's ``grad_norm`` under a sparse name. It *is* the norm of the masked gradient
      (before clipping), because the hooks zero unselected entries during backward, before Trainer measures it;
    - ``entropy_kept_fraction`` / ``entropy_threshold`` with ``entropy_quantile < 1``: share of completion tokens
      that kept their gradient and the entropy threshold, averaged over the forwards since the previous log.

    A ``TrainerCallback.on_log`` cannot do this: ``Trainer.log`` appends a copy of the logs to ``log_history`` before
    callbacks run.
    """
    trainer = sparse.trainer
    original_log = trainer.log

    def log(logs: dict, *args, **kwargs):
        if "loss" in logs:
            logs["sparse/trained_fraction"] = sparse.trained_fraction
            inner = unwrap_optimizer(trainer.optimizer)
            if isinstance(inner, MaskedAdamW):
                logs["sparse/optimizer_state_bytes"] = inner.state_bytes()
                if inner.skip_nonfinite:
                    logs["sparse/skipped_steps"] = inner.skipped_steps
            if "grad_norm" in logs:
                logs["sparse/masked_grad_norm"] = logs["grad_norm"]
            if sparse.entropy_tokens is not None:
                logs.update(sparse.entropy_tokens.pop_metrics())
        return original_log(logs, *args, **kwargs)

    return patch_attribute(trainer, "log", log)
