"""Every refusal raises a message that says what to do instead, and a refused sparsify writes nothing: no hooks, no
frozen parameters, no patched methods, no callback, no optimizer factory. ``remove()`` undoes a successful one."""

import pytest
import torch
from peft import LoraConfig

from sparse_rl import SparseConfig, SubnetworkMask, UnsupportedTrainerSetup, sparsify
from sparse_rl.discovery import random_mask
from tests.trl_cases import build_trainer, snapshot

PATCHED = ("log", "_load_from_checkpoint", "_load_optimizer_and_scheduler", "_forward", "sparse_training")


def _fingerprint(trainer) -> dict:
    model = trainer.model
    return {
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        # dense masking hooks, or compact-gradient hooks (compact_grads is on by default in one process)
        "hooks": {n: len(p._backward_hooks or {}) + len(p._post_accumulate_grad_hooks or {})
                  for n, p in model.named_parameters()},
        "compact_grad": {n: hasattr(p, "compact_grad") for n, p in model.named_parameters()},
        "accelerator_clip_grad_norm_": trainer.accelerator.__dict__.get("clip_grad_norm_"),
        "trainer_attributes": {k: trainer.__dict__.get(k) for k in PATCHED},
        "model_forward": model.__dict__.get("forward"),
        "callbacks": list(trainer.callback_handler.callbacks),
        "optimizer_cls_and_kwargs": trainer.optimizer_cls_and_kwargs,
        "weights": snapshot(model),
    }


def _assert_same(before: dict, after: dict) -> None:
    weights_before, weights_after = before.pop("weights"), after.pop("weights")
    assert before == after
    assert all(torch.equal(weights_after[n], w) for n, w in weights_before.items())


def _empty_mask(trainer):
    return SubnetworkMask({n: torch.zeros(p.shape, dtype=torch.bool) for n, p in trainer.model.named_parameters()})


def _fake(attribute, value):
    def setup(trainer):
        setattr(trainer, attribute, value)
        return SparseConfig(discovery="random")

    return setup


def _on_model(attribute, value):
    def setup(trainer):
        setattr(trainer.model, attribute, value)
        return SparseConfig(discovery="random")

    return setup


def _user_optimizer(trainer):
    # what Trainer.__init__ does with optimizers=(optimizer, None); the real path is in test_trl_grpo.py
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    return SparseConfig(discovery="random")


def _twice(trainer):
    sparsify(trainer, SparseConfig(discovery="random"))
    return SparseConfig(discovery="random")


CASES = {
    # name: (trainer, trainer options, set-up returning the config, expected message)
    "deepspeed": ("sft", {}, _fake("is_deepspeed_enabled", True), "DeepSpeed .* launch without DeepSpeed"),
    "fsdp": ("sft", {}, _fake("is_fsdp_enabled", True), "FSDP1 .* use FSDP2"),
    "user-optimizer": ("sft", {}, _user_optimizer, "construct the trainer without optimizers="),
    "optimizer-cls": ("sft", {}, _fake("optimizer_cls_and_kwargs", (torch.optim.SGD, {"lr": 0.1})),
                      "remove the custom optimizer"),
    "optim-name": ("sft", {"optim": "adafactor"}, lambda t: SparseConfig(discovery="random"),
                   "optim='adafactor' would be ignored"),
    "mask-shape": ("sft", {}, lambda t: SparseConfig(mask=SubnetworkMask({
        "model.layers.0.mlp.up_proj.weight": torch.ones(3, 3, dtype=torch.bool)})), "up_proj.weight.*shape"),
    "mask-name": ("sft", {}, lambda t: SparseConfig(mask=SubnetworkMask({
        "model.layers.9.mlp.up_proj.weight": torch.ones(64, 32, dtype=torch.bool)})), "does not have"),
    "mask-excluded": ("sft", {}, lambda t: SparseConfig(mask=random_mask(t.model, 0.1), exclude=("embed_tokens",)),
                      "drop the pattern from exclude"),
    "mask-empty": ("sft", {}, lambda t: SparseConfig(mask=_empty_mask(t)), "selects no entry"),
    "quantized": ("sft", {}, _on_model("hf_quantizer", object()), "quantized.*dequantise"),
    "peft": ("sft", {"trainer_kwargs": {"peft_config": LoraConfig(r=2, target_modules=["q_proj"])}},
             lambda t: SparseConfig(discovery="random"), "PEFT models are not supported.*pass the plain model"),
    "entropy-reward": ("reward", {}, lambda t: SparseConfig(discovery="random", entropy_quantile=0.2),
                       "RewardTrainer scores whole sequences"),
    "entropy-label-smoothing": ("sft", {"label_smoothing_factor": 0.1},
                                lambda t: SparseConfig(discovery="random", entropy_quantile=0.2), "full logits"),
    "entropy-twice": ("grpo", {"top_entropy_quantile": 0.2},
                      lambda t: SparseConfig(discovery="random", entropy_quantile=0.2), "set only one of them"),
    "online-dpo-probe": ("online_dpo", {}, lambda t: SparseConfig(discovery="gradient"), "discovery='random'"),
    "already-sparsified": ("sft", {}, _twice, "already sparsified"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refusal_writes_nothing(case, tiny_checkpoint, tmp_path):
    name, options, setup, message = CASES[case]
    trainer = build_trainer(name, tiny_checkpoint, tmp_path, **options)
    config = setup(trainer)
    before = _fingerprint(trainer)
    with pytest.raises(UnsupportedTrainerSetup if case not in ("mask-shape", "mask-name") else ValueError,
                       match=message):
        sparsify(trainer, config)
    _assert_same(before, _fingerprint(trainer))


def test_refuses_what_is_not_a_trainer():
    with pytest.raises(UnsupportedTrainerSetup, match="expects a transformers/TRL Trainer"):
        sparsify(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("entropy_quantile", [1.0, 0.2])
def test_remove_restores_the_trainer(entropy_quantile, tiny_checkpoint, tmp_path):
    trainer = build_trainer("sft", tiny_checkpoint, tmp_path)
    before = _fingerprint(trainer)
    sparse = sparsify(trainer, SparseConfig(discovery="random", exclude=("embed_tokens",),
                                            entropy_quantile=entropy_quantile))
    during = _fingerprint(trainer)
    assert during["model_forward"] is not before["model_forward"] or entropy_quantile == 1.0
    assert not during["requires_grad"]["model.embed_tokens.weight"]
    assert sum(during["hooks"].values()) > 0
    sparse.remove()
    _assert_same(before, _fingerprint(trainer))
