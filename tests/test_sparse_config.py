"""SparseConfig options reach what they configure: probe score/budget, 8-bit state, stochastic rounding, shared
reference; and bad values are refused before anything is changed."""

from __future__ import annotations

import pytest
import torch

from sparse_rl import SparseConfig, sparsify
from sparse_rl.discovery import ProbeOptions, gradient_mask_from_trainer
from sparse_rl.optim import MaskedAdamW, unwrap_optimizer
from sparse_rl.reference import SharedReference, check_shared_reference_possible
from sparse_rl.trl import UnsupportedTrainerSetup
from tests.trl_cases import build_trainer, changed_entries, snapshot


def _inner_optimizer(trainer) -> MaskedAdamW:
    return unwrap_optimizer(trainer.optimizer)


@pytest.mark.parametrize("kwargs,match", [
    ({"probe": {"score": "hessian"}}, "score must be one of"),
    ({"probe": {"budget": "per_layer"}}, "budget must be one of"),
    ({"state_bits": 16}, "state_bits"),
    ({"stochastic_rounding": True}, "master_weights=False"),
])
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseConfig(**kwargs)


def test_probe_options_as_dataclass_or_dict():
    assert SparseConfig(probe={"steps": 2, "score": "adam"}).probe == ProbeOptions(steps=2, score="adam")
    assert SparseConfig().probe == ProbeOptions()
    with pytest.raises(TypeError, match="probe must be a ProbeOptions"):
        SparseConfig(probe=2)


def test_probe_score_and_budget_reach_discovery(tiny_checkpoint, tmp_path):
    """sparsify's probe equals a direct probe with the same score and budget on an identically built trainer."""
    probe = ProbeOptions(steps=2, score="fisher", budget="global")
    sparse = sparsify(build_trainer("dpo", tiny_checkpoint, tmp_path / "a"), SparseConfig(density=0.1, probe=probe))
    direct = gradient_mask_from_trainer(build_trainer("dpo", tiny_checkpoint, tmp_path / "b"), 0.1, probe)
    per_tensor = gradient_mask_from_trainer(build_trainer("dpo", tiny_checkpoint, tmp_path / "c"), 0.1,
                                            ProbeOptions(steps=2, score="fisher"))
    assert sparse.mask == direct
    assert sparse.mask != per_tensor, "global and per-tensor budgets gave the same mask"
    densities = [float(s.float().mean()) for _, s in direct.items()]
    assert max(densities) - min(densities) > 0.05, "a global budget should spread unevenly over tensors"


@pytest.mark.parametrize("state_bits", [32, 8])
def test_state_bits_reach_the_optimizer(state_bits, tiny_checkpoint, tmp_path):
    trainer = build_trainer("grpo", tiny_checkpoint, tmp_path)
    before = snapshot(trainer.model)
    sparse = sparsify(trainer, SparseConfig(discovery="random", density=0.3, state_bits=state_bits))
    trainer.train()
    optimizer = _inner_optimizer(trainer)
    assert isinstance(optimizer, MaskedAdamW) and optimizer.state_bits == state_bits
    moment_dtypes = {state["exp_avg"].dtype for state in optimizer.state.values() if "exp_avg" in state}
    assert moment_dtypes == {torch.uint8 if state_bits == 8 else torch.float32}
    assert changed_entries(before, trainer.model, sparse.mask, selected=False) == 0
    assert changed_entries(before, trainer.model, sparse.mask, selected=True) > 0


def test_stochastic_rounding_reaches_the_optimizer(tiny_checkpoint, tmp_path):
    trainer = build_trainer("sft", tiny_checkpoint, tmp_path, dtype=torch.bfloat16)
    sparsify(trainer, SparseConfig(discovery="random", density=0.3, master_weights=False, stochastic_rounding=True))
    trainer.train()
    optimizer = _inner_optimizer(trainer)
    assert optimizer.stochastic_rounding and not optimizer.master_weights


@pytest.mark.parametrize("kind,metric", [("dpo", "rewards/margins"), ("grpo", "kl")])
def test_shared_reference_option_matches_true_copy(kind, metric, tiny_checkpoint, tmp_path):
    overrides = {"beta": 0.2} if kind == "grpo" else {"beta": 0.5}
    logs = {}
    for shared in (False, True):
        trainer = build_trainer(kind, tiny_checkpoint, tmp_path / str(shared), max_steps=3, **overrides)
        copy = trainer.ref_model
        sparsify(trainer, SparseConfig(discovery="random", density=0.2, shared_reference=shared))
        assert isinstance(trainer.ref_model, SharedReference) == shared
        if shared:
            assert all(m is not copy for m in trainer.accelerator._models), "the reference copy was not released"
        del copy
        trainer.train()
        logs[shared] = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs[True]) == len(logs[False]) == 3
    for a, b in zip(logs[False], logs[True]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7)
        assert b[metric] == pytest.approx(a[metric], rel=1e-5, abs=1e-6)
    assert any(abs(e[metric]) > 1e-4 for e in logs[False][1:]), f"{metric} never moved; the comparison is vacuous"


def test_shared_reference_refusal_leaves_trainer_untouched(tiny_checkpoint, tmp_path):
    trainer = build_trainer("grpo", tiny_checkpoint, tmp_path, beta=0.0)
    with pytest.raises(ValueError, match="keeps no reference model"):
        sparsify(trainer, SparseConfig(discovery="random", density=0.2, shared_reference=True))
    assert getattr(trainer, "sparse_training", None) is None
    assert trainer.optimizer_cls_and_kwargs is None
    assert all(p.requires_grad and not p._backward_hooks for p in trainer.model.parameters())


def test_remove_refuses_once_the_reference_copy_is_freed(tiny_checkpoint, tmp_path):
    trainer = build_trainer("dpo", tiny_checkpoint, tmp_path, beta=0.5)
    sparse = sparsify(trainer, SparseConfig(discovery="random", density=0.2, shared_reference=True))
    with pytest.raises(UnsupportedTrainerSetup, match="reference copy was freed"):
        sparse.remove()


def test_shared_reference_refused_under_fsdp(tiny_checkpoint, tmp_path):
    trainer = build_trainer("dpo", tiny_checkpoint, tmp_path, beta=0.5)
    trainer.is_fsdp_enabled = True  # the flag accelerate's FSDP plugin sets; FSDP itself needs several processes
    with pytest.raises(ValueError, match="under FSDP"):
        check_shared_reference_possible(trainer)
