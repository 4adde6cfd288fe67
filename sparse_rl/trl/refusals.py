"""Everything ``sparsify`` refuses, checked before it changes anything: a refused ``sparsify`` leaves the trainer and
the model exactly as they were."""

from __future__ import annotations

from transformers import Trainer

from .. import _compat
from ..distributed import is_distributed


class UnsupportedTrainerSetup(ValueError):
    """The trainer is configured in a way sparse_rl cannot train correctly (yet)."""


class IncompatibleLibraryVersion(UnsupportedTrainerSetup):
    """The installed TRL/transformers/accelerate lack a private piece sparse_rl relies on (see
    :mod:`sparse_rl._compat`)."""


def refuse_incompatible_libraries(trainer: Trainer, use: _compat.Use) -> None:
    missing = _compat.missing_pieces(trainer, use)
    if missing:
        raise IncompatibleLibraryVersion(_compat.describe_missing(missing, trainer))


def refuse_unsupported(trainer: Trainer) -> None:
    """Refusals that depend on the trainer alone (not on the ``SparseConfig``)."""
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
        refuse_unsupported_fsdp(trainer)
    if getattr(getattr(trainer, "state", None), "global_step", 0) > 0:
        raise UnsupportedTrainerSetup(f"this trainer has already trained {trainer.state.global_step} steps with its "
                                      "dense optimizer; call sparsify before train(), on a newly built trainer (load "
                                      "the trained weights into it to continue from them)")
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


def compact_grads_refusal(trainer: Trainer) -> str | None:
    """Why compact gradients cannot run with this trainer, or None when they can (``compact_grads=None`` then turns
    them on)."""
    if is_distributed() or trainer.args.world_size > 1:
        return (f"compact_grads=True runs in a single process, but this run has {trainer.args.world_size} processes: "
                "DDP and FSDP reduce the dense .grad across processes, which compact gradients free during backward; "
                "set compact_grads=False (or leave it unset)")
    if trainer.args.fp16:
        return ("compact_grads=True is not supported with fp16=True: the loss scaler unscales the dense .grad, which "
                "compact gradients free; use bf16 or compact_grads=False (or leave it unset)")
    return None


def resolve_compact_grads(trainer: Trainer, requested: bool | None) -> bool:
    """``SparseConfig.compact_grads`` for this trainer: None means on wherever supported; an explicit True where it
    is not supported is refused."""
    refusal = compact_grads_refusal(trainer)
    if requested and refusal is not None:
        raise UnsupportedTrainerSetup(refusal)
    return refusal is None if requested is None else bool(requested)


def refuse_unsupported_fsdp(trainer: Trainer) -> None:
    """FSDP2 is supported (see :mod:`sparse_rl.restrict.sharded`); FSDP1, and optimizer checkpoints under FSDP2,
    are not."""
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


def entropy_site(trainer: Trainer) -> str:
    """Where the high-entropy restriction goes in this trainer: ``"fused"`` (the fused LM-head forward) or
    ``"online_dpo"`` (``OnlineDPOTrainer._forward``); refuses trainers without token log-probs."""
    name = type(trainer).__name__
    from trl import GRPOTrainer, RewardTrainer, SFTTrainer

    if isinstance(trainer, RewardTrainer):
        raise UnsupportedTrainerSetup("entropy_quantile needs per-token log-probs, but RewardTrainer scores whole "
                                      "sequences with a scalar head; use entropy_quantile=1.0 with RewardTrainer")
    if is_online_dpo(trainer):
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
    if not _compat.has_fused_lm_head(trainer.model):
        raise UnsupportedTrainerSetup(
            f"entropy_quantile is applied to TRL's fused LM-head forward (add_fused_lm_head), which {name} does not "
            "use; it is supported for GRPOTrainer, GMPOTrainer, RLOOTrainer, DPOTrainer, SFTTrainer, KTOTrainer and "
            "OnlineDPOTrainer. Use entropy_quantile=1.0 with this trainer")
    return "fused"


def is_online_dpo(trainer: Trainer) -> bool:
    if not any(cls.__name__ == "OnlineDPOTrainer" for cls in type(trainer).__mro__):
        return False
    from trl.experimental.online_dpo import OnlineDPOTrainer

    return isinstance(trainer, OnlineDPOTrainer)
