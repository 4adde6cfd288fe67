"""Make an existing TRL (or plain transformers) trainer train only a subnetwork.

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=..., train_dataset=...)
    sparsify(trainer, SparseConfig(density=0.1))
    trainer.train()

``sparsify`` (1) picks or loads the mask, (2) installs gradient hooks so every consumer of ``.grad`` sees the masked
gradient, and (3) hands the trainer a factory for :class:`MaskedAdamW` through ``trainer.optimizer_cls_and_kwargs``
(transformers calls a non-Optimizer factory with the model, which gives the optimizer the parameter names).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Trainer

from .config import SparseConfig
from .discovery import gradient_mask_from_trainer, random_mask
from .hooks import GradientRestriction, restrict_gradients
from .mask import SubnetworkMask
from .optim import MaskedAdamW


class UnsupportedTrainerSetup(ValueError):
    """The trainer is configured in a way sparse_rl cannot train correctly (yet)."""


@dataclass
class SparseTraining:
    """What ``sparsify`` attached to a trainer; ``remove()`` restores dense training before ``train()``."""

    trainer: Trainer
    mask: SubnetworkMask
    restriction: GradientRestriction

    @property
    def trained_fraction(self) -> float:
        """Selected entries over all parameters of the model (frozen ones included)."""
        return self.mask.density_of(self.trainer.model)

    def remove(self) -> None:
        self.restriction.remove()
        self.trainer.optimizer_cls_and_kwargs = None
        self.trainer.__dict__.pop("log", None)  # drop the instance-level log wrapper
        self.trainer.sparse_training = None


def sparsify(trainer: Trainer, config: SparseConfig | None = None) -> SparseTraining:
    """Restrict ``trainer`` to a subnetwork chosen by ``config``; call before ``trainer.train()``."""
    config = config or SparseConfig()
    _refuse_unsupported(trainer)
    model = trainer.model
    for name, param in model.named_parameters():
        if any(pattern in name for pattern in config.exclude):
            param.requires_grad_(False)

    mask = _resolve_mask(trainer, config)
    restriction = restrict_gradients(model, mask)
    trainer.optimizer_cls_and_kwargs = (
        _MaskedAdamWFactory,
        {"mask": mask, "trainer": trainer, "master_weights": config.master_weights},
    )
    sparse = SparseTraining(trainer=trainer, mask=mask, restriction=restriction)
    _log_sparse_metrics(sparse)
    trainer.sparse_training = sparse
    return sparse


def _resolve_mask(trainer: Trainer, config: SparseConfig) -> SubnetworkMask:
    model = trainer.model
    if config.mask is not None:
        mask = config.mask if isinstance(config.mask, SubnetworkMask) else SubnetworkMask.load(config.mask)
        mask.check_matches(model.named_parameters())
        return mask
    if config.discovery == "random":
        return random_mask(model, config.density, seed=config.seed)
    return gradient_mask_from_trainer(trainer, config.density, steps=config.probe_steps)


def _refuse_unsupported(trainer: Trainer) -> None:
    if not isinstance(trainer, Trainer):
        raise UnsupportedTrainerSetup(f"sparsify expects a transformers/TRL Trainer, got {type(trainer).__name__}")
    if getattr(trainer, "sparse_training", None) is not None:
        raise UnsupportedTrainerSetup("this trainer is already sparsified; call trainer.sparse_training.remove() "
                                      "first to change the configuration")
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise UnsupportedTrainerSetup("DeepSpeed steps flat fp32 partitions inside engine.step(), which ignores a "
                                      "per-parameter mask; launch without DeepSpeed (plain accelerate/DDP) instead")
    if getattr(trainer, "is_fsdp_enabled", False):
        raise UnsupportedTrainerSetup("FSDP shards parameters after the optimizer is built, so the mask would no "
                                      "longer line up; launch without FSDP (plain accelerate/DDP) instead")
    if trainer.optimizer is not None:
        raise UnsupportedTrainerSetup("the trainer already has an optimizer (passed via optimizers=...); sparse_rl "
                                      "builds its own MaskedAdamW, so construct the trainer without optimizers=")
    if trainer.optimizer_cls_and_kwargs is not None:
        raise UnsupportedTrainerSetup("the trainer has a custom optimizer_cls_and_kwargs; sparse_rl needs to set "
                                      "it to MaskedAdamW, so remove the custom optimizer")
    model = trainer.model
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        raise UnsupportedTrainerSetup("the model is quantized; sparse_rl updates weights in place and needs plain "
                                      "fp32/bf16/fp16 weights (dequantise and reload the model first)")
    if hasattr(model, "peft_config"):
        raise UnsupportedTrainerSetup("PEFT models are not supported: a subnetwork mask replaces the adapter; pass "
                                      "the base model without peft_config")


class _MaskedAdamWFactory:
    """Called by ``Trainer.create_optimizer`` as ``_MaskedAdamWFactory()(model, **kwargs)``."""

    def __call__(self, model: torch.nn.Module, *, mask: SubnetworkMask, trainer: Trainer, master_weights: bool):
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
                           eps=args.adam_epsilon, master_weights=master_weights)


def _log_sparse_metrics(sparse: SparseTraining) -> None:
    """Wrap ``trainer.log`` so every training log carries the trained share and optimizer-state bytes.

    A ``TrainerCallback.on_log`` cannot do this: ``Trainer.log`` appends a copy of the logs to ``log_history``
    before callbacks run.
    """
    trainer = sparse.trainer
    original_log = trainer.log

    def log(logs: dict, *args, **kwargs):
        if "loss" in logs:
            logs["sparse/trained_fraction"] = sparse.trained_fraction
            inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
            if isinstance(inner, MaskedAdamW):
                logs["sparse/optimizer_state_bytes"] = inner.state_bytes()
        return original_log(logs, *args, **kwargs)

    trainer.log = log
    sparse._original_log = original_log
