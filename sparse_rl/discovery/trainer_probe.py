"""The gradient probe on a TRL/transformers trainer: its own data pipeline and ``compute_loss`` as the probe's loss,
with the trainer left as it was.

It relies on private trainer internals: ``_prepare_inputs`` (turns a batch into model inputs, generating completions
for online trainers), and the attributes a probe batch mutates, which :class:`probe_trainer_state` lists and restores
(``_step``, ``_buffered_inputs``, ``_metrics``, ...).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch

from .._compat import PROBED_TRAINER_ATTRIBUTES
from ..mask import SubnetworkMask
from .probe import ProbeOptions, as_probe_options, gradient_mask


def trainer_loss_fn(trainer, reuse_batches: bool = False) -> Callable[[int], torch.Tensor]:
    """A ``loss_fn(step)`` running the trainer's own data pipeline and ``compute_loss`` on successive batches.

    For online trainers (GRPO, RLOO) each probe batch generates fresh completions. Internal counters and logged
    metrics touched by the probe are restored by :func:`probe_trainer_state`. With ``reuse_batches`` each step's
    prepared inputs (its generations, for online trainers) are kept, and a later call with the same ``step`` reuses
    them: what a probe in several passes needs to score every pass on the same batches.
    """
    dataloader = trainer.get_train_dataloader()
    batches = iter(dataloader)
    prepared = {}

    def loss_fn(step: int) -> torch.Tensor:
        nonlocal batches
        trainer.model.train()
        if step in prepared:
            inputs = prepared[step]
        else:
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(dataloader)
                batch = next(batches)
            if hasattr(trainer, "_buffered_inputs"):
                trainer._buffered_inputs = None  # force generation for every probe batch
            inputs = trainer._prepare_inputs(batch)
            if reuse_batches:
                prepared[step] = inputs
        with trainer.compute_loss_context_manager():
            return trainer.compute_loss(trainer.model, inputs)

    return loss_fn


class probe_trainer_state:
    """Context manager restoring the trainer attributes that a loss probe mutates (step counters, buffered
    generations, logged metrics, RNG), so a probed run trains like an unprobed one."""

    _ATTRS = PROBED_TRAINER_ATTRIBUTES

    def __init__(self, trainer):
        self.trainer = trainer

    def __enter__(self):
        self.saved = {a: copy.deepcopy(getattr(self.trainer, a)) for a in self._ATTRS if hasattr(self.trainer, a)}
        self.rng = torch.random.get_rng_state()
        # set by Trainer's training loop; GRPO/RLOO's loss normalisation reads it
        self.added_accumulation = not hasattr(self.trainer, "current_gradient_accumulation_steps")
        if self.added_accumulation:
            self.trainer.current_gradient_accumulation_steps = self.trainer.args.gradient_accumulation_steps
        return self

    def __exit__(self, *exc):
        for attr, value in self.saved.items():
            setattr(self.trainer, attr, value)
        torch.random.set_rng_state(self.rng)
        if self.added_accumulation:
            del self.trainer.current_gradient_accumulation_steps
        return False


def gradient_mask_from_trainer(
    trainer,
    density: float,
    options: ProbeOptions | None = None,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
) -> SubnetworkMask:
    """Probe discovery (:func:`~sparse_rl.discovery.probe.gradient_mask`) on a TRL/transformers trainer's own loss,
    leaving the trainer as it was.

    The AdamW hyperparameters of the ``"adam"``/``"precision"`` scores (lr, betas, eps) that ``options`` leaves unset
    come from ``trainer.args``. With ``args.activation_checkpointing`` (TRL's default) the probe checkpoints
    activations as training will (:class:`probe_activation_checkpointing`).
    """
    args = trainer.args
    options = as_probe_options(options).with_adamw_defaults(
        lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    with probe_trainer_state(trainer), probe_activation_checkpointing(trainer):
        return gradient_mask(trainer.model, trainer_loss_fn(trainer, reuse_batches=options.passes > 1), density,
                             options, include=include, exclude=exclude)


class probe_activation_checkpointing:
    """Context manager: the trainer's model checkpoints activations during the probe when ``train()`` will.

    transformers' ``Trainer`` turns ``args.activation_checkpointing`` on inside ``train()``, after ``sparsify`` has
    probed, so without this the probe's forward keeps every layer's activations: on SmolLM2-135M with the
    choose_by batch the probe's process peak was 5121 MiB without and 3338 MiB with it, LoRA's training 3380
    (``benchmarks/results/sparsify_memory_probe_checkpointing.md``).
    Recomputing a layer gives the same gradients, so the mask does not change. On exit the model is switched back
    to how it was, including the input-gradient hook that enabling adds, so ``train()`` enables it as usual.
    """

    def __init__(self, trainer):
        self.model, self.args = trainer.model, trainer.args

    def __enter__(self):
        model = self.model
        self.enabled = (bool(getattr(self.args, "activation_checkpointing", False))
                        and hasattr(model, "activation_checkpointing_enable")
                        and not model.is_activation_checkpointing)
        if self.enabled:
            had_input_hook = bool(getattr(model, "_require_grads_hooks", None))
            # what Trainer.train() passes (transformers 5.24): two of the kwargs are its own, the rest torch's
            kwargs = dict(self.args.activation_checkpointing_kwargs or {})
            every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None,
                                                  every_n_layers=every_n_layers, offload=offload)
            self.added_input_hook = not had_input_hook and bool(getattr(model, "_require_grads_hooks", None))
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.model.activation_checkpointing_disable()
            if self.added_input_hook:
                self.model.disable_input_require_grads()
        return False
