"""Every private attribute, method and code shape of TRL, transformers, accelerate and torch that sparse_rl relies on.

sparse_rl plugs into trainers it does not own. Most of that goes through public API (``optimizer_cls_and_kwargs``,
callbacks, ``Accelerator.clip_grad_norm_``), but some of it cannot: the checkpoint loaders that must see the mask
before the optimizer state is read, ``Trainer.log`` (callbacks see the logs after ``log_history`` copied them),
TRL's fused LM-head forward, OnlineDPO's ``_forward``, the trainer state a loss probe must restore. A release of
those libraries may rename any of them without notice. :data:`RELIANCES` lists each one with the sparse_rl code
that uses it, and :func:`missing_pieces` checks the ones a given ``sparsify`` call will use, so that ``sparsify``
refuses up front, before it changes anything, instead of patching half-way or silently training something else.

This module imports no TRL, transformers or accelerate at import time (``MaskedAdamW`` users need none of them);
each check imports what it looks at.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

# What the test suite ran against (README, "Tested versions"); pyproject.toml declares the same trl and transformers
# range (tests/test_compat.py checks they agree).
TESTED_VERSIONS = {"trl": ">=1.16,<1.17", "transformers": ">=5.24,<5.25", "accelerate": "==1.16.*"}

# Trainer attributes a loss probe mutates and ``sparse_rl.discovery.probe_trainer_state`` restores afterwards, so a
# probed run trains like an unprobed one: GRPO/RLOO's generation step counter and buffer, the logged metrics and
# completions, token counts, GRPO's adaptive-entropy window.
PROBED_TRAINER_ATTRIBUTES = ("_step", "_buffered_inputs", "_metrics", "_logs", "_total_train_tokens",
                             "_entropy_window_stats", "_last_world_entropy")

# Which of them each TRL trainer (matched by class name along its MRO) must have: if a release renames one, the
# probe would leave the renamed state mutated.
PROBED_ATTRIBUTES_BY_TRAINER = {
    "GRPOTrainer": ("_step", "_buffered_inputs", "_metrics", "_logs", "_total_train_tokens", "_last_world_entropy"),
    "RLOOTrainer": ("_step", "_buffered_inputs", "_metrics", "_logs", "_total_train_tokens"),
    "DPOTrainer": ("_metrics", "_total_train_tokens"),
    "KTOTrainer": ("_metrics", "_total_train_tokens"),
    "SFTTrainer": ("_metrics", "_total_train_tokens"),
    "RewardTrainer": ("_metrics", "_total_train_tokens"),
}

# Trainers whose loss calls TRL's fused LM-head forward (``fused_lm_head=True``), where entropy_quantile applies.
FUSED_LM_HEAD_TRAINERS = ("GRPOTrainer", "RLOOTrainer", "DPOTrainer", "SFTTrainer", "KTOTrainer")
FUSED_OUTPUT_FIELDS = ("loss", "log_probs", "entropy", "label_mask", "aux_loss")
ONLINE_DPO_FORWARD_PARAMETERS = ("model", "prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
                                 "vision_inputs")


@dataclass(frozen=True)
class Use:
    """What one ``sparsify`` call will do, which decides the reliances to check."""

    probe: bool = False  # gradient discovery runs the trainer's loss
    entropy: bool = False  # entropy_quantile < 1
    shared_reference: bool = False
    never_built_reference: bool = False  # sparse_rl.trl.build_trainer keeps TRL from loading the reference copy


@dataclass(frozen=True)
class Reliance:
    """One private piece of another library sparse_rl relies on."""

    library: str
    piece: str  # what is relied on, as a reader would look it up
    used_by: str  # the sparse_rl code that uses it, and why
    present: Callable[[object], bool]  # given the trainer: is the piece there, in the shape relied on?
    applies: Callable[[object, Use], bool] = lambda trainer, use: True


def _class_names(trainer) -> set[str]:
    return {cls.__name__ for cls in (trainer if isinstance(trainer, type) else type(trainer)).__mro__}


def _has_method(name: str) -> Callable[[object], bool]:
    return lambda trainer: callable(getattr(type(trainer), name, None))


def _first_parameters(function, names: tuple[str, ...]) -> bool:
    try:
        parameters = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return False
    if parameters and parameters[0] == "self":
        parameters = parameters[1:]
    return tuple(parameters[: len(names)]) == names


def _checkpoint_save_order(trainer) -> bool:
    """``_save_checkpoint`` saves the model first, writes ``trainer_state.json`` later and rotates at the end."""
    from transformers import trainer as trainer_module

    # TRL's trainers override it only to write a model card before calling this one
    source = _source_of(getattr(trainer_module.Trainer, "_save_checkpoint", None))
    steps = ("self.save_model(", "TRAINER_STATE_NAME", "rotate_checkpoints(")
    positions = [source.find(step) for step in steps]
    return getattr(trainer_module, "TRAINER_STATE_NAME", None) == "trainer_state.json" and -1 not in positions \
        and positions == sorted(positions)


def _optimizer_factory_is_called_with_the_model(trainer) -> bool:
    """``Trainer.create_optimizer`` calls a non-Optimizer first element of ``optimizer_cls_and_kwargs`` as a factory
    with the model (how ``MaskedAdamW`` gets the parameter names)."""
    try:
        from transformers.trainer_optimizer import is_optimizer_factory
    except ImportError:
        return False
    return "optimizer_cls_and_kwargs" in vars(trainer) and is_optimizer_factory(type("Factory", (), {}))


def _accelerated_optimizer_keeps_optimizer(trainer) -> bool:
    from accelerate.optimizer import AcceleratedOptimizer

    return "optimizer" in AcceleratedOptimizer.__init__.__code__.co_names


def _fused_forward_code():
    """The code object of the forward ``add_fused_lm_head`` installs (a nested function of it)."""
    try:
        from trl.trainer.utils import add_fused_lm_head
    except ImportError:
        return None
    return next((const for const in add_fused_lm_head.__code__.co_consts
                 if inspect.iscode(const) and const.co_name == "_fused_forward"), None)


def _keyword_names(code) -> tuple[str, ...]:
    return code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]


def has_fused_lm_head(model) -> bool:
    """True when ``model.forward`` was patched by ``trl.trainer.utils.add_fused_lm_head`` (or wraps that patch): an
    instance-level bound method whose code takes a ``fused_lm_head`` argument."""
    function = getattr(model.__dict__.get("forward"), "__func__", None)
    code = getattr(function, "__code__", None)
    return code is not None and "fused_lm_head" in _keyword_names(code)


def _fused_lm_head_shape(trainer) -> bool:
    code = _fused_forward_code()
    if code is None or "fused_lm_head" not in _keyword_names(code):
        return False
    from trl.trainer.utils import FusedCausalLMOutput

    fields = getattr(FusedCausalLMOutput, "__dataclass_fields__", {})
    return all(name in fields for name in FUSED_OUTPUT_FIELDS)


def _online_dpo_forward_shape(trainer) -> bool:
    forward = getattr(type(trainer), "_forward", None)
    return forward is not None and _first_parameters(forward, ONLINE_DPO_FORWARD_PARAMETERS)


def _probed_attributes_present(trainer) -> bool:
    return not _missing_probed_attributes(trainer)


def _missing_probed_attributes(trainer) -> list[str]:
    names = _class_names(trainer)
    expected = {a for cls, attrs in PROBED_ATTRIBUTES_BY_TRAINER.items() if cls in names for a in attrs}
    return sorted(a for a in expected if not hasattr(trainer, a))


def _reference_options_present(trainer) -> bool:
    fields = getattr(type(trainer.args), "__dataclass_fields__", {})
    expected = {"sync_ref_model"} if _is("GRPOTrainer", "RLOOTrainer")(trainer, Use()) else set()
    if _is("DPOTrainer", "KTOTrainer")(trainer, Use()):
        expected = {"sync_ref_model", "precompute_ref_log_probs"}
    return expected <= set(fields)


def _source_of(function) -> str:
    try:
        return inspect.getsource(function) if function is not None else ""
    except (OSError, TypeError):
        return ""


_REFERENCE_CONSTRUCTION = re.compile(r"self\.ref_model\s*=\s*create_model_from_path\(\s*get_config_model_id\("
                                     r"\s*self\.model\.config\s*\)")


def reference_construction_module(trainer_cls: type):
    """The module whose ``create_model_from_path`` the ``__init__`` of ``trainer_cls`` (or of a base class) calls as
    ``self.ref_model = create_model_from_path(get_config_model_id(self.model.config), ...)`` to build its reference
    copy (TRL 1.16 GRPOTrainer and RLOOTrainer, which take no ``ref_model=``), or None."""
    for cls in trainer_cls.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None or not _REFERENCE_CONSTRUCTION.search(_source_of(init)):
            continue
        module = sys.modules.get(cls.__module__)
        return module if callable(getattr(module, "create_model_from_path", None)) else None
    return None


def _builds_reference_from_config(trainer) -> bool:
    return reference_construction_module(trainer if isinstance(trainer, type) else type(trainer)) is not None


def _is(*class_names: str) -> Callable[[object, Use], bool]:
    return lambda trainer, use: bool(_class_names(trainer) & set(class_names))


RELIANCES: tuple[Reliance, ...] = (
    Reliance("transformers", "Trainer._load_from_checkpoint(resume_from_checkpoint, ...)",
             "sparse_rl.trl.patches: checks the checkpoint's mask before the weights are loaded",
             lambda t: _has_method("_load_from_checkpoint")(t)
             and _first_parameters(type(t)._load_from_checkpoint, ("resume_from_checkpoint",))),
    Reliance("transformers", "Trainer._load_optimizer_and_scheduler(checkpoint)",
             "sparse_rl.trl.patches: checks the checkpoint's mask before the compact optimizer state is loaded",
             lambda t: _has_method("_load_optimizer_and_scheduler")(t)
             and _first_parameters(type(t)._load_optimizer_and_scheduler, ("checkpoint",))),
    Reliance("transformers", "Trainer._save_checkpoint calling save_model(checkpoint folder) first and writing "
             "trainer.TRAINER_STATE_NAME last, before rotating old checkpoints out",
             "sparse_rl.trl.patches: the mask is written with the weights, and resume_from_checkpoint=True skips "
             "checkpoints without trainer_state.json (interrupted saves)",
             _checkpoint_save_order),
    Reliance("transformers", "Trainer.log(logs, ...)",
             "sparse_rl.trl.patches: adds sparse/* entries before log_history copies the logs",
             lambda t: _has_method("log")(t) and _first_parameters(type(t).log, ("logs",))),
    Reliance("transformers", "Trainer.optimizer_cls_and_kwargs called as a factory with the model "
             "(transformers.trainer_optimizer.is_optimizer_factory)",
             "sparse_rl.trl.patches: hands the trainer a MaskedAdamW factory that sees the parameter names",
             _optimizer_factory_is_called_with_the_model),
    Reliance("transformers", "Trainer.is_deepspeed_enabled / Trainer.is_fsdp_enabled",
             "sparse_rl.trl.refusals: refuses DeepSpeed and FSDP1, follows FSDP2 sharding",
             lambda t: "is_deepspeed_enabled" in vars(t) and "is_fsdp_enabled" in vars(t)),
    Reliance("accelerate", "AcceleratedOptimizer.optimizer",
             "sparse_rl.optim.unwrap_optimizer: reaches MaskedAdamW inside the trainer's wrapped optimizer",
             _accelerated_optimizer_keeps_optimizer),
    Reliance("accelerate", "Accelerator._models",
             "sparse_rl.reference: drops TRL's reference copy from the accelerator so its memory is freed",
             lambda t: isinstance(getattr(getattr(t, "accelerator", None), "_models", None), list),
             lambda t, use: use.shared_reference),
    Reliance("trl", "add_fused_lm_head's forward taking fused_lm_head= and FusedCausalLMOutput fields "
             + "/".join(FUSED_OUTPUT_FIELDS),
             "sparse_rl._compat.has_fused_lm_head (found through co_varnames) and sparse_rl.restrict.tokens: "
             "restrict the per-token log-probs to high-entropy tokens",
             _fused_lm_head_shape,
             lambda t, use: use.entropy and bool(_class_names(t) & set(FUSED_LM_HEAD_TRAINERS))),
    Reliance("trl", "GRPOTrainer.top_entropy_quantile",
             "sparse_rl.trl.refusals: refuses setting both TRL's and sparse_rl's entropy quantile",
             lambda t: hasattr(t, "top_entropy_quantile"),
             lambda t, use: use.entropy and _is("GRPOTrainer")(t, use)),
    Reliance("transformers", "Trainer.compute_loss_func / Trainer.label_smoother",
             "sparse_rl.trl.refusals: refuses entropy_quantile when SFT computes its loss from full logits",
             lambda t: hasattr(t, "compute_loss_func") and hasattr(t, "label_smoother"),
             lambda t, use: use.entropy and _is("SFTTrainer")(t, use)),
    Reliance("trl", "OnlineDPOTrainer._forward(" + ", ".join(ONLINE_DPO_FORWARD_PARAMETERS) + ")",
             "sparse_rl.restrict.tokens: restricts OnlineDPO's completion log-probs to high-entropy tokens",
             _online_dpo_forward_shape,
             lambda t, use: use.entropy and _is("OnlineDPOTrainer")(t, use)),
    Reliance("transformers", "Trainer._prepare_inputs",
             "sparse_rl.discovery: the gradient probe runs the trainer's own data pipeline (and GRPO/RLOO "
             "generation)",
             _has_method("_prepare_inputs"),
             lambda t, use: use.probe),
    Reliance("trl", "the trainer state a loss probe mutates: " + ", ".join(PROBED_TRAINER_ATTRIBUTES),
             "sparse_rl.discovery.probe_trainer_state: restores it after the gradient probe",
             _probed_attributes_present,
             lambda t, use: use.probe),
    Reliance("trl", "args.sync_ref_model (DPO/KTO/GRPO/RLOO) and args.precompute_ref_log_probs (DPO/KTO)",
             "sparse_rl.reference.check_shared_reference_possible: refuses a reference that drifts or was "
             "precomputed (read with getattr, so a rename would pass silently)",
             _reference_options_present,
             lambda t, use: use.shared_reference),
    Reliance("trl", "GRPOTrainer reading self.current_gradient_accumulation_steps in its loss",
             "sparse_rl.discovery.probe_trainer_state: sets it for the probe, which runs before train() does",
             lambda t: "current_gradient_accumulation_steps" in _source_of(type(t).compute_loss)
             or "current_gradient_accumulation_steps" in _source_of(getattr(type(t), "_compute_loss", None)),
             lambda t, use: use.probe and _is("GRPOTrainer")(t, use)),
    Reliance("trl", "GRPOTrainer/RLOOTrainer.__init__ building the reference copy with its module's "
             "create_model_from_path(get_config_model_id(self.model.config), ...)",
             "sparse_rl.trl.build_trainer: hands those trainers an unbound SharedReference instead of a loaded copy "
             "(the module's create_model_from_path is replaced for the duration of the constructor)",
             _builds_reference_from_config,
             lambda t, use: use.never_built_reference and bool(_class_names(t) & {"GRPOTrainer", "RLOOTrainer"})),
    Reliance("transformers", "PretrainedConfig._name_or_path",
             "sparse_rl.delta.SparseDelta.from_trained: the default base_model_name_or_path (not used by sparsify)",
             lambda t: True,
             lambda t, use: False),
    Reliance("torch", "DTensor._local_tensor",
             "sparse_rl.restrict.sharded: masks the local shard of FSDP2 parameters and gradients",
             lambda t: "_local_tensor" in _dtensor_attributes(),
             lambda t, use: bool(getattr(t, "is_fsdp_enabled", False))),
)


def _dtensor_attributes() -> set[str]:
    from torch.distributed.tensor import DTensor

    names = set(getattr(DTensor, "__slots__", ()))
    for cls in DTensor.__mro__:
        names |= set(getattr(cls, "__annotations__", {}))
    return names


def missing_pieces(trainer, use: Use) -> list[Reliance]:
    """The reliances ``use`` needs that this install of the libraries does not provide."""
    missing = []
    for reliance in RELIANCES:
        if not reliance.applies(trainer, use):
            continue
        try:
            present = reliance.present(trainer)
        except (ImportError, AttributeError):
            present = False
        if not present:
            missing.append(reliance)
    return missing


def installed_versions() -> dict[str, str]:
    found = {}
    for name in TESTED_VERSIONS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def describe_missing(missing: list[Reliance], trainer=None) -> str:
    """One message naming every missing piece, the installed versions and the tested range."""
    lines = []
    for reliance in missing:
        detail = ""
        if trainer is not None and reliance.present is _probed_attributes_present:
            detail = f" (missing: {', '.join(_missing_probed_attributes(trainer))})"
        lines.append(f"  - {reliance.library}: {reliance.piece}{detail}; used by {reliance.used_by}")
    installed = ", ".join(f"{name} {v}" for name, v in installed_versions().items())
    tested = ", ".join(f"{name}{spec}" for name, spec in TESTED_VERSIONS.items())
    return ("sparse_rl relies on private parts of TRL/transformers/accelerate that this install does not have "
            "in the shape it expects:\n" + "\n".join(lines) + f"\nInstalled: {installed}. sparse_rl was tested with "
            f"{tested}; install versions in that range (pip install 'sparse-rl' resolves them).")

