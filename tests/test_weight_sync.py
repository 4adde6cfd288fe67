"""Sparse weight sync (sparse_rl.sync): patches hold exactly the selected entries whose bf16 value changed, a receiver
ends bit-equal to the trainer's weights rounded to bf16, and refused patches leave it unchanged.

The two-process tests run real GRPO steps on the tiny model and a receiver process forked from the test (gloo over
loopback), like tests/test_ddp.py.
"""

from __future__ import annotations

import copy
import multiprocessing
import socket

import numpy as np
import pytest
import torch

from sparse_rl import SparseConfig, sparsify
from sparse_rl.discovery import random_mask
from sparse_rl.mask import SubnetworkMask
from sparse_rl.optim import unwrap_optimizer
from sparse_rl.sync import (
    AnchorNeeded,
    DistributedPatchSink,
    PatchProducer,
    PatchReceiver,
    PatchRefused,
    WeightSyncConfig,
    attach_weight_sync,
    decode_patch,
    encode_patch,
    weights_digest,
)
from sparse_rl.sync.patch import decode_ranks, encode_positions
from sparse_rl.sync.transport import connect
from tests.tiny import make_tiny_model
from tests.trl_cases import build_trainer

BF16 = torch.bfloat16


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).view(torch.int16 if tensor.element_size() == 2 else torch.int32).clone()


def _rounded_equal(trainer_model, receiver_model) -> None:
    received = dict(receiver_model.named_parameters())
    for name, param in trainer_model.named_parameters():
        assert torch.equal(_bits(param.detach().to(BF16)), _bits(received[name])), f"{name} differs"


def _receiver_bits(model) -> dict[str, torch.Tensor]:
    return {name: _bits(p) for name, p in model.named_parameters()}


def _move_selected(model, mask, scale: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in mask:
                noise = torch.randn(param.shape, generator=generator) * scale * param.abs().clamp_min(1e-3)
                param.add_(noise * mask[name])


@pytest.fixture
def setup():
    model = make_tiny_model()
    mask = random_mask(model, 0.2, seed=1)
    receiver_model = copy.deepcopy(model).to(BF16)
    return model, mask, receiver_model


def test_receiver_follows_the_trainer_bit_for_bit_and_patches_hold_only_changed_selected_entries(setup):
    model, mask, receiver_model = setup
    producer = PatchProducer(model, mask)
    receiver = PatchReceiver(receiver_model, mask)
    anchor = producer.build()
    assert anchor.anchor and anchor.num_values == mask.num_selected
    receiver.apply(encode_patch(anchor))
    for step in range(4):
        before = {n: p.detach().to(BF16) for n, p in model.named_parameters()}
        _move_selected(model, mask, scale=1e-2, seed=step)
        patch = producer.build()
        assert not patch.anchor and patch.sequence == step + 1
        _, checked = receiver.check(decode_patch(encode_patch(patch)))
        expected_changed = 0
        params = dict(model.named_parameters())
        for tensor in checked:
            assert bool(mask[tensor.name].reshape(-1)[tensor.flat_indices].all()), "an unselected entry was sent"
            now = params[tensor.name].detach().to(BF16).reshape(-1)
            changed = (_bits(now) != _bits(before[tensor.name])).nonzero().squeeze(1)
            assert torch.equal(tensor.flat_indices, changed), f"{tensor.name}: patch positions != changed entries"
            assert torch.equal(_bits(tensor.values), _bits(now[changed]))
        for name, param in params.items():
            expected_changed += int((_bits(param.detach().to(BF16)) != _bits(before[name])).sum())
        assert patch.num_values == expected_changed > 0
        receiver.apply(encode_patch(patch))
        _rounded_equal(model, receiver_model)


def test_patch_is_empty_when_no_value_crosses_a_bf16_step(setup):
    model, mask, receiver_model = setup
    producer = PatchProducer(model, mask)
    receiver = PatchReceiver(receiver_model, mask)
    receiver.apply(producer.build())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # move every selected fp32 value onto its bf16 rounding: fp32 changes, bf16 does not
        for name, param in model.named_parameters():
            if name in mask:
                param.copy_(torch.where(mask[name], param.to(BF16).float(), param))
    assert sum(int((p != before[n]).sum()) for n, p in model.named_parameters()) > 1000, "fp32 weights did not move"
    patch = producer.build()
    assert patch.is_empty and patch.tensors == [] and patch.sequence == 1
    receiver.apply(encode_patch(patch))  # the sequence still advances, so the next patch is not a gap
    _move_selected(model, mask, scale=1e-2, seed=7)
    receiver.apply(encode_patch(producer.build()))
    _rounded_equal(model, receiver_model)


def test_anchor_every_k_and_on_request(setup):
    model, mask, receiver_model = setup
    producer = PatchProducer(model, mask, anchor_every=3)
    anchors = [producer.build().anchor for _ in range(7)]
    assert anchors == [True, False, False, True, False, False, True]
    producer = PatchProducer(model, mask, anchor_every=3, first_sync="base")
    assert [producer.build().anchor for _ in range(4)] == [False, False, False, True]
    producer.request_anchor()
    assert producer.build().anchor


def _refusal_cases(model, mask, receiver_model):
    producer = PatchProducer(model, mask)
    receiver = PatchReceiver(receiver_model, mask)
    receiver.apply(encode_patch(producer.build()))
    _move_selected(model, mask, scale=1e-2, seed=1)
    first = encode_patch(producer.build())
    _move_selected(model, mask, scale=1e-2, seed=2)
    second = encode_patch(producer.build())
    receiver.apply(first)
    other_mask = random_mask(model, 0.2, seed=9)
    wrong_mask = PatchProducer(model, other_mask).build()
    other_base = copy.deepcopy(model)
    with torch.no_grad():  # an unselected entry differs: another base
        name, selection = next(iter(mask.items()))
        dict(other_base.named_parameters())[name].view(-1)[(~selection).reshape(-1).nonzero()[0]] += 1.0
    wrong_base = PatchProducer(other_base, mask).build()
    return receiver, first, second, wrong_mask, wrong_base


@pytest.mark.parametrize("case", ["duplicate", "out-of-order", "truncated", "corrupted", "wrong-mask", "wrong-base",
                                  "other-stream", "unselected-index"])
def test_refused_patches_leave_the_receiver_unchanged(setup, case):
    model, mask, receiver_model = setup
    receiver, first, second, wrong_mask, wrong_base = _refusal_cases(model, mask, receiver_model)
    state = (receiver.stream, receiver.sequence)
    before = _receiver_bits(receiver_model)
    if case == "duplicate":
        data, error, match = first, PatchRefused, "duplicate or arrived out of order"
    elif case == "out-of-order":
        patch = decode_patch(second)
        patch.sequence += 1  # patch 3 arrives while 2 is missing
        data, error, match = encode_patch(patch), AnchorNeeded, "skips patch"
    elif case == "truncated":
        data, error, match = second[: len(second) - 5], PatchRefused, "truncated"
    elif case == "corrupted":
        data = bytearray(second)
        data[-3] ^= 0x40
        error, match = PatchRefused, "checksum"
    elif case == "wrong-mask":
        data, error, match = wrong_mask, PatchRefused, "another mask"
    elif case == "wrong-base":
        data, error, match = wrong_base, PatchRefused, "another base"
    elif case == "other-stream":
        patch = decode_patch(second)
        patch.stream = "f" * 32
        data, error, match = encode_patch(patch), AnchorNeeded, "another sender stream"
    else:  # a flat index outside the selection, with a valid checksum: the receiver itself must refuse it
        patch = decode_patch(second)
        tensor = patch.tensors[0]
        unselected = (~mask[tensor.name]).reshape(-1).nonzero()[0].to(torch.int32)
        tensor.encoding = "flat_i32"
        tensor.values = tensor.values[:1]
        tensor.positions = unselected.numpy().tobytes()
        data, error, match = encode_patch(patch), PatchRefused, "not selected by the mask"
    with pytest.raises(error, match=match):
        receiver.apply(data)
    assert (receiver.stream, receiver.sequence) == state
    after = _receiver_bits(receiver_model)
    assert all(torch.equal(before[n], after[n]) for n in before), "a refused patch changed the receiver's weights"
    receiver.apply(second)  # the right next patch still applies
    _rounded_equal(model, receiver_model)


def test_first_sync_relative_to_the_base(setup):
    model, mask, receiver_model = setup
    fresh = copy.deepcopy(receiver_model)
    producer = PatchProducer(model, mask, first_sync="base")
    _move_selected(model, mask, scale=1e-2, seed=3)
    first = producer.build()
    assert not first.anchor and first.base_start and 0 < first.num_values < mask.num_selected
    receiver = PatchReceiver(receiver_model, mask)
    receiver.apply(encode_patch(first))
    _rounded_equal(model, receiver_model)
    _move_selected(model, mask, scale=1e-2, seed=4)
    receiver.apply(encode_patch(producer.build()))
    _rounded_equal(model, receiver_model)

    # a receiver that already follows a stream, or holds other selected values, asks for an anchor instead
    with pytest.raises(AnchorNeeded, match="applied patches since it loaded"):
        receiver.apply(encode_patch(PatchProducer(model, mask, first_sync="base").build()))
    with torch.no_grad():
        name, selection = next(iter(mask.items()))
        dict(fresh.named_parameters())[name].view(-1)[selection.reshape(-1).nonzero()[0]] += 1.0
    with pytest.raises(AnchorNeeded, match="selected entries differ"):
        PatchReceiver(fresh, mask).apply(encode_patch(first))


def test_fresh_receiver_needs_an_anchor(setup):
    model, mask, receiver_model = setup
    producer = PatchProducer(model, mask)
    producer.build()
    patch = producer.build()
    with pytest.raises(AnchorNeeded, match="has not taken one yet"):
        PatchReceiver(receiver_model, mask).apply(patch)


@pytest.mark.parametrize("num_selected, count", [(10, 0), (10, 3), (40000, 5), (40000, 30000), (70000, 100),
                                                 (70000, 69999), (12, 12), (300000, 3000), (300000, 30), (3, 1)])
def test_position_encodings_round_trip(num_selected, count):
    generator = torch.Generator().manual_seed(count)
    numel = num_selected * 3
    selected_flat = torch.randperm(numel, generator=generator)[:num_selected].sort().values
    selection = torch.zeros(numel, dtype=torch.bool)
    selection[selected_flat] = True
    changed = torch.randperm(num_selected, generator=generator)[:count].sort().values
    for index_encoding in ("auto", "flat_i32"):
        encoding, positions = encode_positions(changed, num_selected, selected_flat, index_encoding)
        ranks = decode_ranks(encoding, positions, count, num_selected, selection, selected_flat, "t")
        assert torch.equal(ranks, changed), encoding
        if index_encoding == "auto":
            assert len(positions) <= 4 * count
        if index_encoding == "auto" and num_selected == 300000 and count == 3000:
            assert encoding == "rank_gaps"  # gaps of ~100 ranks: one or two bytes each
    gaps = np.diff(changed.numpy(), prepend=-1) - 1
    for encoding, positions in [("rank_gaps", _varint_bytes(gaps)), ("rank_bits", None)]:
        if positions is not None:
            assert torch.equal(decode_ranks(encoding, positions, count, num_selected, selection, selected_flat, "t"),
                               changed)


def _varint_bytes(values) -> bytes:
    from sparse_rl.sync.patch import _varint_encode, _varint_lengths

    values = np.asarray(values, dtype=np.int64)
    return _varint_encode(values.astype(np.uint64), _varint_lengths(values))


@pytest.mark.parametrize("num_selected,count", [(10, 3), (300_000, 1), (300_000, 500), (300_000, 20_000),
                                                 (2**20, 50), (70_000, 69_999)])
def test_compiled_position_encoder_writes_the_numpy_encoders_bytes(num_selected, count, monkeypatch):
    from sparse_rl.sync import patch as patch_module

    ranks = torch.from_numpy(np.sort(np.random.default_rng(count).choice(num_selected, count, replace=False)))
    selected_flat = torch.arange(num_selected) * 3
    compiled = encode_positions(ranks, num_selected, selected_flat, "auto")
    monkeypatch.setattr(patch_module, "gap_varints", None)
    assert encode_positions(ranks, num_selected, selected_flat, "auto") == compiled


def test_varint_gaps_round_trip_large_values_and_refuse_garbage():
    from sparse_rl.sync.patch import _varint_decode

    values = np.array([0, 1, 127, 128, 16383, 16384, 2**31 - 1, 2**40], dtype=np.int64)
    data = _varint_bytes(values)
    assert len(data) == 1 + 1 + 1 + 2 + 2 + 3 + 5 + 6
    assert np.array_equal(_varint_decode(data, len(values), "t").astype(np.int64), values)
    with pytest.raises(PatchRefused, match="varint"):
        _varint_decode(data[:-1], len(values), "t")  # cut inside the last value
    with pytest.raises(PatchRefused, match="varint"):
        _varint_decode(data, len(values) + 1, "t")


def test_fused_bf16_scan_equals_torch_rounding():
    """The numba scan rounds exactly like tensor.to(torch.bfloat16) (NaN payloads, infinities, subnormals, ties)."""
    from sparse_rl.sync.scan import changed_bf16

    generator = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=generator, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0x7FC00001, 0x7F800001, 0xFFFFFFFF - 2**32, 0x7F800000, 0xFF800000 - 2**32, 0x00000001,
                            0x00008000, 0x00018000, 0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x80000000 - 2**32],
                           dtype=torch.int64).to(torch.int32)
    param = torch.cat([bits, special]).view(torch.float32)
    index = torch.randperm(param.numel(), generator=generator)[:150_000].sort().values.to(torch.int32)
    last = torch.zeros(index.numel(), dtype=torch.bfloat16)
    expected = param[index.long()].to(torch.bfloat16)
    ranks, values = changed_bf16(param, index, last)
    differs = expected.view(torch.int16) != 0
    assert torch.equal(ranks, differs.nonzero().squeeze(1))
    assert torch.equal(values.view(torch.int16), expected.view(torch.int16)[differs])
    assert torch.equal(last.view(torch.int16), expected.view(torch.int16))
    assert changed_bf16(param, index, last)[0].numel() == 0  # nothing changed since


# ---------------------------------------------------------------------------------------------- fused scan
def _optimised_problem(dtype, density=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = {"a": (300, 1000), "b": (77,), "c": (33, 129)}  # a: parallel launches; c: a partial last block
    params = {n: torch.nn.Parameter((torch.randn(s, generator=generator) * 0.05).to(dtype)) for n, s in shapes.items()}
    mask = SubnetworkMask({n: torch.rand(s, generator=generator) < density for n, s in shapes.items()})
    return params, mask, generator


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("variant", [
    ("float32", "blocks", 32, {}), ("float32", "general", 32, {}), ("float32", "blocks", 8, {}),
    ("float32", "general", 8, {}), ("bfloat16", "general", 32, {"master_weights": True}),
    ("bfloat16", "general", 32, {"master_weights": False, "stochastic_rounding": True}),
    ("bfloat16", "general", 32, {"master_weights": False}),
], ids=lambda v: "-".join(str(x) for x in v[:3]) + ("-" + "-".join(v[3]) if v[3] else ""))
@pytest.mark.parametrize("compact", [False, True], ids=["dense-grads", "compact-grads"])
def test_rounded_copy_is_what_torch_rounds_after_every_step(variant, compact, threads, monkeypatch):
    """MaskedAdamW.track_rounded: after each step the copy holds param[selected].to(bf16) bit for bit, on the AVX-512
    block path and the general path, fp32/8-bit state, fp32 and bf16 parameters; NaN values (a NaN gradient entry)
    round as torch rounds them. Untracked, the optimizer steps the same values."""
    from sparse_rl import MaskedAdamW

    dtype_name, path, state_bits, options = variant
    dtype = getattr(torch, dtype_name)
    monkeypatch.setenv("SPARSE_RL_CPU_BLOCKS", "1" if path == "blocks" else "0")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    params, mask, generator = _optimised_problem(dtype)
    twins = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    tracked = MaskedAdamW(params.items(), mask, lr=1e-3, backend="cpu", state_bits=state_bits, **options)
    plain = MaskedAdamW(twins.items(), mask, lr=1e-3, backend="cpu", state_bits=state_bits, **options)
    rounded = tracked.track_rounded(params)
    for step in range(3):
        for name, param in params.items():
            grad = torch.randn(param.shape, generator=generator)
            if step == 1 and dtype == torch.float32:
                grad.view(-1)[::97] = float("nan")
            for target in (param, twins[name]):
                if compact:
                    target.grad, target.compact_grad = None, grad[mask[name]].to(dtype)
                else:
                    target.grad = grad.to(dtype)
        tracked.step()
        plain.step()
        for name, param in params.items():
            expected = param.detach().reshape(-1)[mask[name].reshape(-1)].to(BF16)
            assert torch.equal(_bits(rounded[name]), _bits(expected)), f"{name}: step {step}"
            assert torch.equal(_bits(param), _bits(twins[name])), f"{name}: tracking changed the step"
    assert any(bool(torch.isnan(param).any()) for param in params.values()) == (dtype == torch.float32)
    tracked.untrack_rounded(params)
    before = {name: rounded[name].clone() for name in params}
    for param in params.values():
        param.grad = torch.randn(param.shape, generator=generator).to(dtype)
    tracked.step()
    assert all(torch.equal(_bits(rounded[name]), _bits(before[name])) for name in params), "untracked copy written"


def test_compact_scan_and_flat_indices_of_ranks():
    from sparse_rl.kernels.layout import SelectionLayout

    from sparse_rl.sync.scan import changed_compact, flat_of_ranks

    generator = torch.Generator().manual_seed(0)
    for size in (0, 1, 3, 4, 7, 10_001):
        last = torch.randint(-2**15, 2**15, (size,), generator=generator, dtype=torch.int16)
        current = torch.where(torch.rand(size, generator=generator) < 0.1,
                              torch.randint(-2**15, 2**15, (size,), generator=generator, dtype=torch.int16), last)
        expected = (current != last).nonzero().squeeze(1)
        ranks, values = changed_compact(current.view(BF16), last.view(BF16))
        assert torch.equal(ranks, expected) and torch.equal(values.view(torch.int16), current[expected])
        assert torch.equal(last, current)
    selection = torch.rand(5000, generator=generator) < 0.07
    selection[4990:] = True
    layout = SelectionLayout.from_selection(selection)
    flat = selection.nonzero().squeeze(1)
    ranks = torch.randperm(flat.numel(), generator=generator)[:100].sort().values
    assert torch.equal(flat_of_ranks(layout.mask_words, layout.tile_offsets, ranks).long(), flat[ranks])


def _grpo_with_sparse(tiny_checkpoint, tmp_path, max_steps, **overrides):
    trainer = build_trainer("grpo", tiny_checkpoint, tmp_path, max_steps=max_steps, **overrides)
    sparse = sparsify(trainer, SparseConfig(mask=random_mask(trainer.model, 0.2, seed=3)))
    return trainer, sparse


def test_fused_scan_emits_the_scans_patches_over_grpo_steps(tiny_checkpoint, tmp_path):
    """Pairs of producers, one fused into MaskedAdamW's step and one scanning the parameters, emit the same bytes
    (stream id aside) after each of 6 real GRPO steps: anchors every 3 syncs, a first sync from the base with a sync
    every 2 steps (a value that moves and comes back between syncs is not sent), int32 flat indices; two fused
    producers share the optimizer's copy."""
    from transformers import TrainerCallback

    trainer, sparse = _grpo_with_sparse(tiny_checkpoint, tmp_path, 6, learning_rate=1e-5)
    optimizer = lambda: trainer.optimizer  # noqa: E731 - created when training starts
    settings = [dict(anchor_every=3), dict(first_sync="base"), dict(index_encoding="flat_i32")]
    pairs = [(PatchProducer(trainer.model, sparse.mask, **kw, optimizer=optimizer, fused_scan="on"),
              PatchProducer(trainer.model, sparse.mask, **kw)) for kw in settings]
    every = [1, 2, 1]
    log = []

    class Compare(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            for (fused, scan), k in zip(pairs, every):
                if state.global_step % k:
                    continue
                fused_patch, scan_patch = fused.build(), scan.build()
                assert fused.fused and not scan.fused
                fused_patch.stream = scan_patch.stream
                assert encode_patch(fused_patch) == encode_patch(scan_patch), f"step {state.global_step}"
                log.append((scan_patch.anchor, scan_patch.num_values, {t.encoding for t in scan_patch.tensors}))

    trainer.add_callback(Compare())
    trainer.train()
    assert len(log) == 6 + 3 + 6
    moved = [values for anchor, values, _ in log if not anchor]
    assert all(values > 0 for values in moved) and max(moved) < sparse.mask.num_selected // 2, "not a real test"
    assert {"flat_i32", "rank_bits"} <= set().union(*(encodings for *_, encodings in log))
    for fused, _ in pairs:
        fused.close()
    assert not unwrap_optimizer(trainer.optimizer)._rounded, "closed producers left a rounded copy"


def test_fused_scan_refuses_an_optimizer_of_another_mask(tiny_checkpoint, tmp_path):
    from sparse_rl.optim import MaskedAdamW

    trainer, sparse = _grpo_with_sparse(tiny_checkpoint, tmp_path, 1)
    trainer.train()
    other = random_mask(trainer.model, 0.2, seed=4)
    for fused_scan in ("auto", "on"):
        producer = PatchProducer(trainer.model, other, optimizer=trainer.optimizer, fused_scan=fused_scan)
        with pytest.raises(ValueError, match="mask the optimizer trains"):
            producer.build()
    # a MaskedAdamW of another model (same names and mask) does not step these tensors
    twin = copy.deepcopy(trainer.model)
    foreign = MaskedAdamW([(n, p) for n, p in twin.named_parameters() if p.requires_grad], sparse.mask)
    with pytest.raises(ValueError, match="not the tensor this MaskedAdamW steps"):
        PatchProducer(trainer.model, sparse.mask, optimizer=foreign).build()
    # not a MaskedAdamW: "on" refuses, "auto" scans (and its patches still hold the model)
    adamw = torch.optim.AdamW(trainer.model.parameters())
    with pytest.raises(RuntimeError, match="not a MaskedAdamW"):
        PatchProducer(trainer.model, sparse.mask, optimizer=adamw, fused_scan="on").build()
    fallback = PatchProducer(trainer.model, sparse.mask, optimizer=adamw)
    assert fallback.build().anchor and not fallback.fused


# ---------------------------------------------------------------------------------------------- two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _receiver_main(checkpoint, mask_path, port):
    from transformers import AutoModelForCausalLM

    from sparse_rl.sync import serve

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=BF16)
    receiver = PatchReceiver(model, SubnetworkMask.load(mask_path))
    serve(receiver, peer=0, group=connect("127.0.0.1", port, rank=1, timeout=120))


class _Receiver:
    """A receiver process forked from the test, and the sender's end of its group."""

    def __init__(self, checkpoint, mask_path):
        port = _free_port()
        self.process = multiprocessing.get_context("fork").Process(target=_receiver_main,
                                                                   args=(checkpoint, mask_path, port))
        self.process.start()
        self.sink = DistributedPatchSink(peer=1, group=connect("127.0.0.1", port, rank=0, timeout=120))

    def stop(self):
        self.sink.stop()
        self.process.join(timeout=60)
        assert self.process.exitcode == 0


def _assert_receiver_holds(receiver: _Receiver, model) -> None:
    assert receiver.sink.digest() == weights_digest(model.named_parameters(), BF16)


@pytest.mark.parametrize("fused_scan", ["off", "on"])
def test_two_processes_grpo_sync_every_step_every_k_resume_and_receiver_restart(tiny_checkpoint, tmp_path,
                                                                                fused_scan):
    mask = random_mask(make_tiny_model(), 0.2, seed=3)
    mask_path = tmp_path / "mask.safetensors"
    mask.save(mask_path)
    receiver = _Receiver(tiny_checkpoint, mask_path)
    try:
        # every step, 3 GRPO steps, checkpoints at 2
        first = build_trainer("grpo", tiny_checkpoint, tmp_path / "first", max_steps=3, save_strategy="steps",
                              save_steps=2)
        sparse = sparsify(first, SparseConfig(mask=mask))
        sync = attach_weight_sync(first, sparse, WeightSyncConfig(sync_every=1, fused_scan=fused_scan),
                                  sink=receiver.sink)
        first.train()
        assert sync.producer.fused == (fused_scan == "on")
        assert [h["anchor"] for h in sync.history] == [True, False, False]
        assert all(h["values"] > 0 for h in sync.history), "training did not move any bf16 value"
        _assert_receiver_holds(receiver, first.model)

        # resume from checkpoint-2 in a new trainer, sync every 2 steps: its first sync is an anchor of a new stream
        resumed = build_trainer("grpo", tiny_checkpoint, tmp_path / "resumed", max_steps=6)
        sparse = sparsify(resumed, SparseConfig(mask=str(tmp_path / "first" / "checkpoint-2" /
                                                          "sparse_mask.safetensors")))
        # first_sync="base": its base-relative first patch is refused (the receiver follows the first stream), and
        # the sync answers with an anchor
        sync = attach_weight_sync(resumed, sparse, WeightSyncConfig(sync_every=2, first_sync="base",
                                                                    fused_scan=fused_scan), sink=receiver.sink)
        resumed.train(resume_from_checkpoint=str(tmp_path / "first" / "checkpoint-2"))
        assert sync.producer.fused == (fused_scan == "on")
        assert [h["anchor"] for h in sync.history] == [True, False]  # steps 4 and 6
        _assert_receiver_holds(receiver, resumed.model)

        # the receiver restarts from the base: it answers the next patch with ANCHOR_NEEDED, the sync sends an anchor
        receiver.stop()
        receiver = _Receiver(tiny_checkpoint, mask_path)
        sync.sink = receiver.sink
        patch = sync.sync()
        assert patch.anchor
        _assert_receiver_holds(receiver, resumed.model)
    finally:
        receiver.stop()


def test_stand_alone_receiver_process(tiny_checkpoint, tmp_path):
    """``python -m sparse_rl.sync.serve``: a fresh process holding the Hugging Face model in bf16."""
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    mask = random_mask(model, 0.2, seed=5)
    mask.save(tmp_path / "mask.safetensors")
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    process = subprocess.Popen([sys.executable, "-m", "sparse_rl.sync.serve", str(tiny_checkpoint),
                                str(tmp_path / "mask.safetensors"), "--port", str(port), "--timeout", "120"], env=env)
    try:
        sink = DistributedPatchSink(peer=1, group=connect("127.0.0.1", port, rank=0, timeout=120))
        producer = PatchProducer(model, mask)
        sink(producer.build())
        _move_selected(model, mask, scale=1e-2, seed=11)
        patch = producer.build()
        assert patch.num_values > 0
        assert sink(patch) == 1
        with pytest.raises(PatchRefused, match="duplicate"):
            sink(patch)
        assert sink.digest() == weights_digest(model.named_parameters(), BF16)
        sink.stop()
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
