"""Make an existing TRL (or plain transformers) trainer train only a subnetwork.

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=..., train_dataset=...)
    sparsify(trainer, SparseConfig(density=0.1))
    trainer.train()

``sparsify`` (1) picks or loads the mask, (2) installs gradient hooks so every consumer of ``.grad`` (clipping,
``grad_norm``, DDP, accumulation) sees the masked gradient, (3) hands the trainer a factory for :class:`MaskedAdamW`
through ``trainer.optimizer_cls_and_kwargs`` (transformers calls a non-Optimizer factory with the model, which gives
the optimizer the parameter names), (4) optionally restricts the loss gradient to high-entropy tokens, (5) saves the
mask into every checkpoint folder and checks it on resume, and (6) adds ``sparse/*`` entries to the training logs.

Every check runs before anything is changed: a refused ``sparsify`` leaves the trainer and the model as they were.

Where the high-entropy restriction is applied (TRL 1.16):

- GRPO (and GMPO), RLOO, DPO, SFT, KTO call ``model(..., labels=..., fused_lm_head=True)``, the forward TRL patches
  in with ``trl.trainer.utils.add_fused_lm_head``; it returns per-token ``log_probs`` and ``entropy``. sparse_rl wraps
  that forward and, for calls with gradients enabled, replaces ``log_probs`` (and ``entropy``, which the GRPO entropy
  bonus differentiates) by ``where(keep, x, x.detach())``. Reference and old-policy log-probs run under
  ``torch.no_grad()`` and are left alone.
- OnlineDPO (``trl.experimental``) computes log-probs from the full logits in ``OnlineDPOTrainer._forward``; that
  method is wrapped and the entropy is computed from the logits it already materialises.
- RewardTrainer scores whole sequences with a scalar head: there are no token log-probs, and the option is refused.
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import SparseConfig
from .discovery import gradient_mask_from_trainer, random_mask
from .distributed import agree_on_mask, is_distributed
from .entropy import HighEntropyTokens, keep_gradient_of, token_entropy_from_logits
from .mask import SubnetworkMask
from .optim import MaskedAdamW, unwrap_optimizer
from .reference import SharedReference, check_shared_reference_possible, install_shared_reference
from .restrict import compact as compact_grad
from .restrict.gradients import GradientRestriction, restrict_gradients
from .restrict.sharded import is_sharded, restrict_sharded_gradients

MASK_FILE_NAME = "sparse_mask.safetensors"


class UnsupportedTrainerSetup(ValueError):
    """The trainer is configured in a way sparse_rl cannot train correctly (yet)."""


@dataclass
class SparseTraining:
    """What ``sparsify`` attached to a trainer; ``remove()`` restores dense training before ``train()``."""

    trainer: Trainer
    mask: SubnetworkMask
    restriction: GradientRestriction
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
        """Undo ``sparsify``: hooks, frozen parameters, patched methods, callback, optimizer factory."""
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
        self.trainer.optimizer_cls_and_kwargs = None
        self.trainer.__dict__.pop("sparse_training", None)


def sparsify(trainer: Trainer, config: SparseConfig | None = None) -> SparseTraining:
    """Restrict ``trainer`` to a subnetwork chosen by ``config``; call after building the trainer, before
    ``trainer.train()``."""
    config = config or SparseConfig()
    _refuse_unsupported(trainer)
    entropy_site = _entropy_site(trainer) if config.entropy_quantile < 1.0 else None
    if config.shared_reference:
        check_shared_reference_possible(trainer)
    if config.compact_grads:
        _refuse_compact_grads(trainer)
    mask = _resolve_mask(trainer, config)
    # every process trains the same entries: the probe scored the global batch, and every mask is checked to agree
    mask = agree_on_mask(mask, discovered=config.mask is None and config.discovery == "gradient")

    # Nothing below refuses user input: from here on the trainer is changed.
    restriction = restrict_gradients(trainer.model, mask, compact=config.compact_grads)
    trainer.optimizer_cls_and_kwargs = (
        _MaskedAdamWFactory,
        {"mask": mask, "trainer": trainer, "master_weights": config.master_weights,
         "state_bits": config.state_bits, "stochastic_rounding": config.stochastic_rounding},
    )
    sparse = SparseTraining(trainer=trainer, mask=mask, restriction=restriction)
    if entropy_site is not None:
        sparse.entropy_tokens = HighEntropyTokens(config.entropy_quantile)
        if entropy_site == "fused":
            sparse._undo.append(restrict_fused_forward(trainer.model, sparse.entropy_tokens))
        else:
            sparse._undo.append(_restrict_online_dpo_forward(trainer, sparse.entropy_tokens))
    if config.compact_grads:  # the trainer's clipping and grad_norm logging read .grad, which is freed
        sparse._undo.append(_patch_attribute(trainer.accelerator, "clip_grad_norm_",
                                             _compact_clip_grad_norm(trainer.accelerator)))
    sparse._undo.append(_save_mask_with_checkpoints(sparse))
    sparse._undo.append(_check_mask_on_resume(sparse))
    sparse._undo.append(_log_sparse_metrics(sparse))
    if getattr(trainer, "is_fsdp_enabled", False):
        sparse._undo.append(_follow_fsdp2_sharding(sparse))
    trainer.sparse_training = sparse
    if config.shared_reference:
        install_shared_reference(trainer, mask)
    return sparse


# ---------------------------------------------------------------------------------------------- checks
def _refuse_unsupported(trainer: Trainer) -> None:
    if not isinstance(trainer, Trainer):
        raise UnsupportedTrainerSetup(f"sparsify expects a transformers/TRL Trainer, got {type(trainer).__name__}")
    if getattr(trainer, "sparse_training", None) is not None:
        raise UnsupportedTrainerSetup("this trainer is already sparsified; call trainer.sparse_training.remove() "
                                      "first to change the configuration")
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None)
        stage = getattr(plugin, "zero_stage", None)
        raise UnsupportedTrainerSetup(
            f"DeepSpeed{'' if stage is None else f' ZeRO stage {stage}'} is not supported: ZeRO (stages 1-3) flattens "
            "the parameters into fp32 partitions and steps them inside engine.step() with its own optimizer wrapper, "
            "so MaskedAdamW's per-parameter masks and compact state would not apply and unselected entries would "
            "move; launch without DeepSpeed: DDP (`accelerate launch --multi_gpu --num_processes N`; MaskedAdamW "
            "already keeps optimizer state for the selected entries only, the memory ZeRO-1/2 would save) or FSDP2 "
            "(`fsdp_version: 2` in the accelerate config) to shard the weights as well")
    if getattr(trainer, "is_fsdp_enabled", False):
        _refuse_unsupported_fsdp(trainer)
    if trainer.optimizer is not None:
        raise UnsupportedTrainerSetup("the trainer already has an optimizer (passed via optimizers=...); sparse_rl "
                                      "builds its own MaskedAdamW, so construct the trainer without optimizers=")
    if trainer.optimizer_cls_and_kwargs is not None:
        raise UnsupportedTrainerSetup("the trainer has a custom optimizer_cls_and_kwargs; sparse_rl needs to set "
                                      "it to MaskedAdamW, so remove the custom optimizer")
    optim = str(getattr(trainer.args.optim, "value", trainer.args.optim))
    if not optim.startswith("adamw"):
        raise UnsupportedTrainerSetup(f"args.optim={optim!r} would be ignored: sparse_rl trains the subnetwork with "
                                      "MaskedAdamW (AdamW on the selected entries); leave optim at its AdamW default")
    model = trainer.model
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        raise UnsupportedTrainerSetup("the model is quantized; sparse_rl updates weights in place and needs plain "
                                      "fp32/bf16/fp16 weights (dequantise and reload the model first)")
    if hasattr(model, "peft_config"):
        raise UnsupportedTrainerSetup(
            "PEFT models are not supported: the adapter already limits training to its own weights and PEFT freezes "
            "the base weights a subnetwork mask would select; pass the plain model (no peft_config) to train a "
            "subnetwork, or use PEFT without sparse_rl")


def _refuse_compact_grads(trainer: Trainer) -> None:
    if is_distributed() or trainer.args.world_size > 1:
        raise UnsupportedTrainerSetup(
            f"compact_grads=True runs in a single process, but this run has {trainer.args.world_size} processes: "
            "DDP and FSDP reduce the dense .grad across processes, which compact gradients free during backward; "
            "set compact_grads=False")
    if trainer.args.fp16:
        raise UnsupportedTrainerSetup("compact_grads=True is not supported with fp16=True: the loss scaler unscales "
                                      "the dense .grad, which compact gradients free; use bf16 or compact_grads=False")


def _compact_clip_grad_norm(accelerator) -> Callable:
    """``Accelerator.clip_grad_norm_`` for compact gradients: what the Trainer calls to clip and to log grad_norm."""

    def clip_grad_norm_(parameters, max_norm, norm_type=2):
        accelerator.unscale_gradients()  # a no-op without a loss scaler (fp16 is refused)
        return compact_grad.clip_grad_norm_(parameters, max_norm, norm_type)

    return clip_grad_norm_


def _refuse_unsupported_fsdp(trainer: Trainer) -> None:
    """FSDP2 is supported (see :mod:`sparse_rl.fsdp`); FSDP1 and optimizer checkpoints under FSDP2 are not."""
    if getattr(getattr(trainer.accelerator.state, "fsdp_plugin", None), "fsdp_version", 1) != 2:
        raise UnsupportedTrainerSetup(
            "FSDP1 flattens the parameters of each wrapped module into one FlatParameter, which a per-parameter mask "
            "cannot follow; use FSDP2: TrainingArguments(fsdp=True, fsdp_config={'version': 2}), or fsdp_version: 2 "
            "in the accelerate config")
    if trainer.args.save_strategy != "no" and not trainer.args.save_only_model:
        raise UnsupportedTrainerSetup(
            "under FSDP2 every process holds the compact optimizer state of its own shard, which accelerate's FSDP "
            "optimizer checkpoint (torch.distributed.checkpoint) cannot save; pass save_only_model=True (checkpoints "
            "keep the weights and the mask) or save_strategy='no'")


def _entropy_site(trainer: Trainer) -> str:
    """Where the high-entropy restriction goes in this trainer: ``"fused"`` (the fused LM-head forward) or
    ``"online_dpo"`` (``OnlineDPOTrainer._forward``); refuses trainers without token log-probs."""
    name = type(trainer).__name__
    from trl import GRPOTrainer, RewardTrainer, SFTTrainer

    if isinstance(trainer, RewardTrainer):
        raise UnsupportedTrainerSetup("entropy_quantile needs per-token log-probs, but RewardTrainer scores whole "
                                      "sequences with a scalar head; use entropy_quantile=1.0 with RewardTrainer")
    if _is_online_dpo(trainer):
        return "online_dpo"
    if isinstance(trainer, GRPOTrainer) and trainer.top_entropy_quantile < 1.0:
        raise UnsupportedTrainerSetup(
            f"both args.top_entropy_quantile={trainer.top_entropy_quantile} (TRL) and SparseConfig.entropy_quantile "
            "are set; they select the same tokens, so set only one of them")
    if isinstance(trainer, SFTTrainer) and (trainer.compute_loss_func is not None
                                            or trainer.label_smoother is not None):
        raise UnsupportedTrainerSetup("entropy_quantile restricts the fused per-token log-probs, but this SFTTrainer "
                                      "computes its loss from full logits (compute_loss_func or label smoothing); "
                                      "drop those or use entropy_quantile=1.0")
    if not _has_fused_lm_head(trainer.model):
        raise UnsupportedTrainerSetup(
            f"entropy_quantile is applied to TRL's fused LM-head forward (add_fused_lm_head), which {name} does not "
            "use; it is supported for GRPOTrainer, GMPOTrainer, RLOOTrainer, DPOTrainer, SFTTrainer, KTOTrainer and "
            "OnlineDPOTrainer. Use entropy_quantile=1.0 with this trainer")
    return "fused"


def _is_online_dpo(trainer: Trainer) -> bool:
    if not any(cls.__name__ == "OnlineDPOTrainer" for cls in type(trainer).__mro__):
        return False
    from trl.experimental.online_dpo import OnlineDPOTrainer

    return isinstance(trainer, OnlineDPOTrainer)


def _has_fused_lm_head(model: torch.nn.Module) -> bool:
    """True when ``model.forward`` was patched by ``trl.trainer.utils.add_fused_lm_head`` (or wraps that patch)."""
    function = getattr(model.__dict__.get("forward"), "__func__", None)
    code = getattr(function, "__code__", None)
    return code is not None and "fused_lm_head" in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]


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
        if _is_online_dpo(trainer):
            raise UnsupportedTrainerSetup("gradient discovery probes trainer.compute_loss, which OnlineDPOTrainer does "
                                          "not use (its loss lives in training_step); use discovery='random' or "
                                          "pass a mask")
        mask = gradient_mask_from_trainer(trainer, config.density, config.probe, exclude=config.exclude)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    if not any(bool(selection.any()) for name, selection in mask.items() if name in trainable):
        raise UnsupportedTrainerSetup("the mask selects no entry of any trainable parameter, so nothing would be "
                                      "trained; check the mask, exclude and which parameters require grad")
    return mask


# ---------------------------------------------------------------------------------------------- optimizer
class _MaskedAdamWFactory:
    """Called by ``Trainer.create_optimizer`` as ``_MaskedAdamWFactory()(model, **kwargs)``."""

    def __call__(self, model: torch.nn.Module, *, mask: SubnetworkMask, trainer: Trainer, master_weights: bool,
                 state_bits: int = 32, stochastic_rounding: bool = False):
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
                           stochastic_rounding=stochastic_rounding, seed=args.seed)


# ---------------------------------------------------------------------------------------------- patching helpers
def _patch_attribute(obj: object, name: str, value: object) -> Callable[[], None]:
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


# ---------------------------------------------------------------------------------------------- entropy
def restrict_fused_forward(model: torch.nn.Module, tokens: HighEntropyTokens) -> Callable[[], None]:
    """Wrap the fused LM-head forward TRL patched onto ``model`` so only the tokens ``tokens`` selects pass a
    gradient (see module docstring); returns the undo."""
    if not _has_fused_lm_head(model):
        raise UnsupportedTrainerSetup("model.forward is not TRL's fused LM-head forward; call "
                                      "trl.trainer.utils.add_fused_lm_head(model, outputs=('log_probs', 'entropy'))")
    fused_forward = model.forward
    aux_loss_coef = getattr(model.config.get_text_config(), "router_aux_loss_coef", 0.0)

    # A bound method with the model's own signature, like TRL's patch: `generate` validates kwargs against it.
    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, **kwargs):
        outputs = fused_forward(*args, fused_lm_head=fused_lm_head, **kwargs)
        if not fused_lm_head or not torch.is_grad_enabled():
            return outputs
        if outputs.entropy is None:
            raise RuntimeError("entropy_quantile needs the fused forward to return per-token entropy; this trainer "
                               "patched its LM head without the 'entropy' output")
        keep = tokens.select(outputs.entropy, outputs.label_mask)
        log_probs = keep_gradient_of(outputs.log_probs, keep)
        outputs["log_probs"] = log_probs
        if outputs.entropy.requires_grad:
            outputs["entropy"] = keep_gradient_of(outputs.entropy, keep)
        # Same value as the fused forward's own loss (the kept values are the same numbers), restricted gradient.
        num_items_in_batch = kwargs.get("num_items_in_batch")
        denominator = outputs.label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / denominator
        if outputs.aux_loss is not None:
            loss = loss + aux_loss_coef * outputs.aux_loss
        outputs["loss"] = loss
        return outputs

    return _patch_attribute(model, "forward", types.MethodType(forward, model))


def _restrict_online_dpo_forward(trainer: Trainer, tokens: HighEntropyTokens) -> Callable[[], None]:
    """Wrap ``OnlineDPOTrainer._forward``: it returns completion log-probs computed from full logits, which a forward
    hook on the policy captures to compute the entropies."""
    policy = trainer.model
    original_forward = trainer._forward

    def _forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask, vision_inputs=None):
        if not torch.is_grad_enabled():  # the reference model's call
            return original_forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask, vision_inputs)
        captured = []
        handle = policy.register_forward_hook(lambda module, args, output: captured.append(output.logits))
        try:
            log_probs = original_forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                         vision_inputs)
        finally:
            handle.remove()
        logits, num_completion = captured[-1], completion_ids.size(1)
        # `_forward` reads the logit before each completion token: positions [L-C-1, L-1) after a prompt, else [0, C)
        length = logits.size(1)
        positions = slice(length - num_completion - 1, length - 1) if length > num_completion else slice(0, None)
        entropy = token_entropy_from_logits(logits[:, positions])
        keep = tokens.select(entropy, completion_mask.bool())
        return keep_gradient_of(log_probs, keep)

    return _patch_attribute(trainer, "_forward", _forward)


# ---------------------------------------------------------------------------------------------- checkpoints
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


def _save_mask_with_checkpoints(sparse: SparseTraining) -> Callable[[], None]:
    callback = SparseCheckpointCallback(sparse)
    sparse.trainer.add_callback(callback)
    return lambda: sparse.trainer.remove_callback(callback)


def _check_mask_on_resume(sparse: SparseTraining) -> Callable[[], None]:
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

    undo_weights = _patch_attribute(trainer, "_load_from_checkpoint", _load_from_checkpoint)
    undo_optimizer = _patch_attribute(trainer, "_load_optimizer_and_scheduler", _load_optimizer_and_scheduler)
    return lambda: (undo_optimizer(), undo_weights())


# ---------------------------------------------------------------------------------------------- FSDP2
class _FSDP2GradientRestriction(TrainerCallback):
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


def _follow_fsdp2_sharding(sparse: SparseTraining) -> Callable[[], None]:
    callback = _FSDP2GradientRestriction(sparse)
    sparse.trainer.add_callback(callback)
    return lambda: sparse.trainer.remove_callback(callback)


# ---------------------------------------------------------------------------------------------- logging
def _log_sparse_metrics(sparse: SparseTraining) -> Callable[[], None]:
    """Wrap ``trainer.log`` so every training log carries ``sparse/*`` entries:

    - ``trained_fraction``: selected entries over all parameters;
    - ``optimizer_state_bytes``: ``MaskedAdamW.state_bytes()`` (moments, master copies, indices);
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
            if "grad_norm" in logs:
                logs["sparse/masked_grad_norm"] = logs["grad_norm"]
            if sparse.entropy_tokens is not None:
                logs.update(sparse.entropy_tokens.pop_metrics())
        return original_log(logs, *args, **kwargs)

    return _patch_attribute(trainer, "log", log)
