"""Sparse patches into vLLM's fused parameters, against a pure-PyTorch emulation of vLLM's weight loading.

vLLM is not installed here (it needs CUDA). The emulation builds the runtime parameters the way vLLM's loaders fill
them with tensor parallelism 1 (written out independently of sparse_rl.sync.vllm.FusedLayout):

- ``qkv_proj`` = ``torch.cat([q_proj, k_proj, v_proj])`` along dim 0 (``QKVParallelLinear``: q at row 0, k at
  ``num_heads * head_size``, v at ``(num_heads + num_kv_heads) * head_size``), biases likewise;
- ``gate_up_proj`` = ``torch.cat([gate_proj, up_proj])`` (``MergedColumnParallelLinear``, shard i at
  ``sum(output_sizes[:i])``);
- ``embed_tokens`` padded with zero rows to a multiple of 64 (``VocabParallelEmbedding``'s ``pad_vocab_size``);
- every other tensor as it is; a tied ``lm_head`` is not a separate parameter.
"""

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

BF16 = torch.bfloat16
PADDING = 64


def _emulated_runtime_tensors(hf_model, dtype=BF16) -> dict[str, torch.Tensor]:
    hf = {name: p.detach().to(dtype) for name, p in hf_model.named_parameters()}
    runtime = {}
    for name, tensor in hf.items():
        if ".q_proj." in name:
            runtime[name.replace(".q_proj.", ".qkv_proj.")] = torch.cat(
                [tensor, hf[name.replace(".q_proj.", ".k_proj.")], hf[name.replace(".q_proj.", ".v_proj.")]])
        elif ".gate_proj." in name:
            runtime[name.replace(".gate_proj.", ".gate_up_proj.")] = torch.cat(
                [tensor, hf[name.replace(".gate_proj.", ".up_proj.")]])
        elif any(part in name for part in (".k_proj.", ".v_proj.", ".up_proj.")):
            continue
        elif "embed_tokens" in name:
            rows = -(-tensor.shape[0] // PADDING) * PADDING
            runtime[name] = torch.cat([tensor, torch.zeros(rows - tensor.shape[0], *tensor.shape[1:], dtype=dtype)])
        else:
            runtime[name] = tensor.clone()
    return runtime


def _as_module(tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    root = torch.nn.Module()
    for name, tensor in tensors.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.register_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(tensor.clone(), requires_grad=False))
    return root


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
