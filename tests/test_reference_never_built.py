"""build_trainer: the reference copy is never loaded, and training equals the shared reference that replaced a copy."""

import pytest
import torch
import trl.trainer.dpo_trainer
import trl.trainer.grpo_trainer
import trl.trainer.kto_trainer
import trl.trainer.rloo_trainer
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer, RLOOConfig, RLOOTrainer

from sparse_rl import SparseConfig, UnsupportedTrainerSetup, _compat, sparsify
from sparse_rl.reference import SharedReference
from sparse_rl.trl import IncompatibleLibraryVersion, build_trainer
from tests.tiny import length_reward, make_tiny_model, make_tiny_tokenizer, prompt_dataset
from tests.trl_cases import kto_dataset, preference_dataset

MODULES = {"dpo": trl.trainer.dpo_trainer, "kto": trl.trainer.kto_trainer, "grpo": trl.trainer.grpo_trainer,
           "rloo": trl.trainer.rloo_trainer}
CONFIG = dict(discovery="random", density=0.2, shared_reference=True)
_COMMON = dict(per_device_train_batch_size=4, max_steps=3, learning_rate=5e-2, use_cpu=True, bf16=False,
               report_to="none", logging_steps=1, save_strategy="no", seed=0)


def _kwargs(kind, checkpoint, tmp_path, **overrides):
    """Construction arguments of a 3-step trainer with a reference (beta 0.5 for DPO/KTO, 0.2 for GRPO/RLOO), shared
    by build_trainer and the TRL-built trainer it is compared with."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    common = dict(_COMMON, output_dir=str(tmp_path / f"out-{kind}"), **overrides)
    tokenizer = make_tiny_tokenizer()
    if kind == "dpo":
        return DPOTrainer, dict(model=model, args=DPOConfig(beta=0.5, **common), train_dataset=preference_dataset(),
                                processing_class=tokenizer)
    if kind == "kto":
        return KTOTrainer, dict(model=model, args=KTOConfig(beta=0.5, **common), train_dataset=kto_dataset(),
                                processing_class=tokenizer)
    online = dict(num_generations=4, max_completion_length=6, temperature=1.0, **common)
    online.setdefault("beta", 0.2)
    config, trainer_cls = (GRPOConfig, GRPOTrainer) if kind == "grpo" else (RLOOConfig, RLOOTrainer)
    return trainer_cls, dict(model=model, reward_funcs=length_reward, args=config(**online),
                             train_dataset=prompt_dataset(), processing_class=tokenizer)


def _make_trainer(kind, checkpoint, tmp_path, ref_model=None, **overrides):
    """The trainer as TRL builds it (loading its reference copy unless ``ref_model`` is given)."""
    trainer_cls, kwargs = _kwargs(kind, checkpoint, tmp_path, **overrides)
    return trainer_cls(**kwargs, **({"ref_model": ref_model} if ref_model is not None else {}))


def _count_loads(monkeypatch, kind):
    """Count the trainer module's calls to create_model_from_path (how TRL loads a reference copy)."""
    module = MODULES[kind]
    calls = []
    original = module.create_model_from_path

    def counting(model_id, *args, **kwargs):
        calls.append(model_id)
        return original(model_id, *args, **kwargs)

    monkeypatch.setattr(module, "create_model_from_path", counting)
    return calls


@pytest.mark.parametrize("kind", ["dpo", "kto", "grpo", "rloo"])
def test_never_built_reference_trains_bit_identically(kind, tiny_checkpoint, tmp_path, monkeypatch):
    calls = _count_loads(monkeypatch, kind)
    replaced = _make_trainer(kind, tiny_checkpoint, tmp_path)  # TRL loads the copy, sparsify frees it
    assert len(calls) == 1, "the comparison trainer should have loaded its copy"
    sparsify(replaced, SparseConfig(**CONFIG))
    replaced.train()

    calls.clear()
    trainer_cls, kwargs = _kwargs(kind, tiny_checkpoint, tmp_path)
    trainer = build_trainer(trainer_cls, SparseConfig(**CONFIG), **kwargs)
    assert calls == [], "build_trainer loaded a reference copy"
    reference = trainer.ref_model
    assert isinstance(reference, SharedReference) and reference.mask is trainer.sparse_training.mask
    assert trainer.sparse_training.mask == replaced.sparse_training.mask
    assert not any(isinstance(m, type(trainer.model)) and m is not trainer.model for m in trainer.accelerator._models)
    trainer.train()

    metric = "rewards/margins" if kind == "dpo" else "kl"
    logs = [[e for e in t.state.log_history if "loss" in e] for t in (replaced, trainer)]
    assert [e["loss"] for e in logs[0]] == [e["loss"] for e in logs[1]]
    assert [e[metric] for e in logs[0]] == [e[metric] for e in logs[1]]
    assert any(abs(e[metric]) > 1e-4 for e in logs[0][1:]), f"{metric} never moved; the comparison is vacuous"
    before = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).state_dict()
    moved = 0
    for (name, a), (_, b) in zip(replaced.model.named_parameters(), trainer.model.named_parameters()):
        assert torch.equal(a, b), f"{name} differs between the freed-copy and never-built runs"
        moved += int((a != before[name]).sum())
    assert moved > 0, "training did not move the policy"


def test_gradient_probe_runs_the_unbound_reference(tiny_checkpoint, tmp_path):
    """Gradient discovery runs DPO's loss, reference forward included, before the mask (so the reference) exists."""
    config = SparseConfig(density=0.2, shared_reference=True, probe={"steps": 1})
    replaced = _make_trainer("dpo", tiny_checkpoint, tmp_path)
    sparsify(replaced, config)
    trainer_cls, kwargs = _kwargs("dpo", tiny_checkpoint, tmp_path)
    trainer = build_trainer(trainer_cls, config, **kwargs)
    assert trainer.sparse_training.mask == replaced.sparse_training.mask
    replaced.train()
    trainer.train()
    for (name, a), (_, b) in zip(replaced.model.named_parameters(), trainer.model.named_parameters()):
        assert torch.equal(a, b), name


def test_unbound_reference_refuses_to_run_outside_sparsify():
    policy = make_tiny_model()
    reference = SharedReference(policy)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(RuntimeError, match="unbound"):
        reference(input_ids=ids)
    with reference.standing_in():
        torch.testing.assert_close(reference(input_ids=ids).logits, policy(input_ids=ids).logits, rtol=0, atol=0)
    assert reference.extra_bytes() == 0 and "unbound" in repr(reference)


def test_unbound_reference_needs_shared_reference(tiny_checkpoint, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    trainer = DPOTrainer(model=model, ref_model=SharedReference(model),
                         args=DPOConfig(beta=0.5, output_dir=str(tmp_path / "out"), **_COMMON),
                         train_dataset=preference_dataset(), processing_class=make_tiny_tokenizer())
    with pytest.raises(UnsupportedTrainerSetup, match="unbound SharedReference"):
        sparsify(trainer, SparseConfig(discovery="random", density=0.2))
    assert getattr(trainer, "sparse_training", None) is None and not trainer.ref_model.is_bound


@pytest.mark.parametrize("kind,overrides,extra,match", [
    ("grpo", {"beta": 0.0}, {}, "beta=0.0"),
    ("grpo", {"sync_ref_model": True}, {}, "sync_ref_model"),
    ("grpo", {"cast_lm_head_to_fp32": True}, {}, "cast_lm_head_to_fp32"),
    ("dpo", {"precompute_ref_log_probs": True}, {}, "precompute_ref_log_probs"),
    ("dpo", {}, {"model": "some/checkpoint"}, "loaded model"),
    ("dpo", {}, {"ref_model": torch.nn.Linear(1, 1)}, "drop ref_model="),
])
def test_refuses_before_building(kind, overrides, extra, match, tiny_checkpoint, tmp_path, monkeypatch):
    built = []
    trainer_cls, kwargs = _kwargs(kind, tiny_checkpoint, tmp_path, **overrides)
    monkeypatch.setattr(trainer_cls, "__init__", lambda self, **kw: built.append(kw))
    with pytest.raises(UnsupportedTrainerSetup, match=match):
        build_trainer(trainer_cls, SparseConfig(**CONFIG), **{**kwargs, **extra})
    assert built == [], "the trainer was built before the refusal"


def test_refuses_when_trl_builds_its_reference_differently(tiny_checkpoint, tmp_path, monkeypatch):
    """The private piece GRPO relies on is in _compat's inventory and checked before the trainer is built."""
    monkeypatch.setattr(_compat, "_REFERENCE_CONSTRUCTION", __import__("re").compile("no such line"))
    trainer_cls, kwargs = _kwargs("grpo", tiny_checkpoint, tmp_path)
    with pytest.raises(IncompatibleLibraryVersion, match="create_model_from_path"):
        build_trainer(trainer_cls, SparseConfig(**CONFIG), **kwargs)
    missing = _compat.missing_pieces(GRPOTrainer, _compat.Use(never_built_reference=True))
    assert any("create_model_from_path" in reliance.piece for reliance in missing)
    monkeypatch.undo()
    assert _compat.reference_construction_module(GRPOTrainer) is trl.trainer.grpo_trainer
    assert _compat.reference_construction_module(RLOOTrainer) is trl.trainer.rloo_trainer
