"""Sparse patches into vLLM's fused parameters, against a pure-PyTorch emulation of vLLM's weight loading
(``tests/vllm_emulation.py``: vLLM is not installed here, it needs CUDA)."""

from __future__ import annotations

import base64
import copy
from types import SimpleNamespace

import pytest
import torch

from sparse_rl.discovery import random_mask
from sparse_rl.sync import PatchProducer, encode_patch
from sparse_rl.sync.receiver import CheckedTensor
from sparse_rl.sync.vllm import (
    FusedLayout,
    SparsePatchWorkerExtension,
    VLLMPatchReceiver,
    attach_to_vllm_generation,
    runtime_patches,
)
from tests.tiny import make_tiny_model
from tests.vllm_emulation import as_module as _as_module
from tests.vllm_emulation import emulated_runtime_tensors as _emulated_runtime_tensors

BF16 = torch.bfloat16


def _model(**overrides):
    return make_tiny_model(attention_bias=True, **overrides)


def _move_selected(model, mask, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in mask:
                param.add_(torch.randn(param.shape, generator=generator) * 1e-2 * param.abs().clamp_min(1e-3)
                           * mask[name])


def _assert_runtime_equal(runtime_model, expected: dict[str, torch.Tensor]) -> None:
    params = dict(runtime_model.named_parameters())
    assert params.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(params[name].view(torch.int16), tensor.view(torch.int16)), f"{name} differs"


@pytest.mark.parametrize("tied", [False, True])
def test_layout_offsets_match_the_emulated_weight_loader(tied):
    model = _model(tie_word_embeddings=tied)
    layout = FusedLayout({n: tuple(p.shape) for n, p in model.named_parameters()})
    runtime = _emulated_runtime_tensors(model)
    assert {t.runtime_name for t in layout.targets.values()} == set(runtime)
    assert sum(".qkv_proj." in n for n in runtime) == 4  # weight and bias of 2 layers: the biases are fused too
    for name, param in model.named_parameters():
        target = layout[name]
        fused = runtime[target.runtime_name].reshape(-1)
        piece = fused[target.flat_offset : target.flat_offset + target.numel]
        assert torch.equal(piece.view(torch.int16), param.detach().to(BF16).reshape(-1).view(torch.int16)), name


def test_from_config_equals_layout_of_the_real_model():
    model = _model()
    direct = FusedLayout({n: tuple(p.shape) for n, p in model.named_parameters()})
    assert FusedLayout.from_config(model.config).targets == direct.targets


def test_vllm_receiver_follows_the_trainer_in_fused_parameters():
    model = _model()
    mask = random_mask(model, 0.2, seed=2)
    runtime_model = _as_module(_emulated_runtime_tensors(model))
    receiver = VLLMPatchReceiver(runtime_model, mask, hf_config=model.config)
    producer = PatchProducer(model, mask)
    receiver.apply(encode_patch(producer.build()))
    for step in range(3):
        _move_selected(model, mask, seed=step)
        patch = producer.build()
        assert not patch.anchor and patch.num_values > 0
        receiver.apply(encode_patch(patch))
        _assert_runtime_equal(runtime_model, _emulated_runtime_tensors(model))


def test_runtime_patches_are_what_vllms_sparse_engine_applies():
    """``runtime_patches`` gives vLLM's SparseWeightPatch form; applied as SparseNCCLWeightTransferEngine._apply_patch
    does (int32 -> long, index_copy_ into the flat runtime parameter) it reproduces the trainer's rounded weights."""
    model = _model()
    mask = random_mask(model, 0.3, seed=4)
    base = copy.deepcopy(model)
    _move_selected(model, mask, seed=9)
    layout = FusedLayout({n: tuple(p.shape) for n, p in model.named_parameters()})
    checked = []
    for name, selection in mask.items():
        now, before = model.get_parameter(name).detach().to(BF16).reshape(-1), base.get_parameter(name).to(BF16)
        changed = ((now.view(torch.int16) != before.reshape(-1).view(torch.int16)) & selection.reshape(-1))
        index = changed.nonzero().squeeze(1)
        checked.append(CheckedTensor(name, index, now[index]))
    runtime = _emulated_runtime_tensors(base)
    triples = runtime_patches(checked, layout)
    assert len({name for name, _, _ in triples}) == len(triples)
    for name, indices, values in triples:
        assert indices.dtype == torch.int32 and values.dtype == BF16
        assert bool((indices[1:] > indices[:-1]).all())
        runtime[name].view(-1).index_copy_(0, indices.long(), values)
    expected = _emulated_runtime_tensors(model)
    for name in expected:
        assert torch.equal(runtime[name].view(torch.int16), expected[name].view(torch.int16)), name


def test_worker_extension_applies_and_answers_refusals(tmp_path):
    model = _model()
    mask = random_mask(model, 0.2, seed=2)
    mask.save(tmp_path / "mask.safetensors")
    worker = SparsePatchWorkerExtension()
    runtime_model = _as_module(_emulated_runtime_tensors(model))
    worker.model_runner = SimpleNamespace(model=runtime_model, model_config=SimpleNamespace(hf_config=model.config))
    producer = PatchProducer(model, mask)
    assert worker.sparse_rl_init(str(tmp_path / "mask.safetensors")) == producer.base_fingerprint

    def send(patch) -> str:
        return worker.sparse_rl_apply(base64.b64encode(encode_patch(patch)).decode())

    anchor = producer.build()
    _move_selected(model, mask, seed=1)
    first = producer.build()
    assert send(first).startswith("anchor ")  # no anchor yet
    assert send(anchor) == "ok 0"
    assert send(first) == "ok 1"
    assert send(first).startswith("refused ") and "duplicate" in send(first)
    _assert_runtime_equal(runtime_model, _emulated_runtime_tensors(model))


class _FakeVLLMGeneration:
    """The attributes of TRL's VLLMGeneration that the sparse sync reads, in colocate mode."""

    def __init__(self, model, runtime_model, **overrides):
        self.mode = "colocate"
        self.tensor_parallel_size = 1
        self.enable_sleep_mode = False
        self.model = model
        self.accelerator = SimpleNamespace(is_main_process=True)
        self.prefix_cache_resets = 0
        worker = SimpleNamespace(model_runner=SimpleNamespace(model=runtime_model))
        self.llm = SimpleNamespace(llm_engine=SimpleNamespace(model_executor=SimpleNamespace(driver_worker=worker)),
                                   reset_prefix_cache=self._reset)
        self.sync_weights = lambda: pytest.fail("TRL's dense sync_weights ran")
        self.__dict__.update(overrides)

    def _reset(self):
        self.prefix_cache_resets += 1


def test_colocate_sync_weights_is_replaced_and_restored():
    model = _model()
    mask = random_mask(model, 0.2, seed=2)
    runtime_model = _as_module(_emulated_runtime_tensors(model))
    generation = _FakeVLLMGeneration(model, runtime_model)
    original = generation.sync_weights
    weight_sync = attach_to_vllm_generation(generation, PatchProducer(model, mask), mask)
    for step in range(3):
        _move_selected(model, mask, seed=step)
        generation.sync_weights()
        _assert_runtime_equal(runtime_model, _emulated_runtime_tensors(model))
    assert [h["anchor"] for h in weight_sync.history] == [True, False, False]
    assert generation.prefix_cache_resets == 3
    weight_sync.remove()
    assert generation.sync_weights is original


@pytest.mark.parametrize("overrides, match", [({"tensor_parallel_size": 2}, "tensor parallelism 1"),
                                              ({"enable_sleep_mode": True}, "sleep")])
def test_unsupported_vllm_setups_are_refused(overrides, match):
    model = _model()
    mask = random_mask(model, 0.2, seed=2)
    generation = _FakeVLLMGeneration(model, _as_module(_emulated_runtime_tensors(model)), **overrides)
    with pytest.raises(ValueError, match=match):
        attach_to_vllm_generation(generation, PatchProducer(model, mask), mask)


def test_grpo_steps_reach_the_emulated_vllm_model_through_attach_weight_sync(tiny_checkpoint, tmp_path):
    """attach_weight_sync on a trainer with a (colocate) ``vllm_generation`` replaces its ``sync_weights``; calling it
    after each real GRPO step (where TRL's generation step would) keeps the emulated vLLM model equal to the trainer's
    weights in bf16."""
    from transformers import TrainerCallback

    from sparse_rl import SparseConfig, sparsify
    from sparse_rl.sync import WeightSyncConfig, attach_weight_sync
    from tests.trl_cases import build_trainer

    trainer = build_trainer("grpo", tiny_checkpoint, tmp_path / "out", max_steps=3)
    sparse = sparsify(trainer, SparseConfig(discovery="random", density=0.2))
    runtime_model = _as_module(_emulated_runtime_tensors(trainer.model))
    trainer.vllm_generation = _FakeVLLMGeneration(trainer.model, runtime_model)
    weight_sync = attach_weight_sync(trainer, sparse, WeightSyncConfig())

    class GenerationStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            trainer.vllm_generation.sync_weights()

    trainer.add_callback(GenerationStep())
    trainer.train()
    assert [h["anchor"] for h in weight_sync.history] == [True, False, False]
    assert all(h["values"] > 0 for h in weight_sync.history), "training did not move any bf16 value"
    _assert_runtime_equal(runtime_model, _emulated_runtime_tensors(trainer.model))


def test_worker_extension_digests_are_the_hugging_face_tensors_in_bf16():
    """``sparse_rl_weight_digests`` (what the server-mode check of ``make gpu-check`` compares) cuts the worker's fused
    parameters into Hugging Face tensors: equal to the digests of the model's own weights in bf16, and a single changed
    entry of the ``v_proj`` part of ``qkv_proj`` changes exactly that tensor's digest."""
    from sparse_rl.sync.vllm import weight_digests

    model = _model()
    worker = SparsePatchWorkerExtension()
    runtime_model = _as_module(_emulated_runtime_tensors(model))
    worker.model_runner = SimpleNamespace(model=runtime_model, model_config=SimpleNamespace(hf_config=model.config))
    expected = weight_digests((n, p.detach().to(BF16)) for n, p in model.named_parameters())
    assert worker.sparse_rl_weight_digests() == expected
    assert all(value.startswith("bfloat16:") for value in expected.values())
    with torch.no_grad():
        runtime_model.get_parameter("model.layers.1.self_attn.qkv_proj.weight").view(-1)[-1] += 1
    answer = worker.sparse_rl_weight_digests()
    assert [n for n in expected if answer[n] != expected[n]] == ["model.layers.1.self_attn.v_proj.weight"]
