"""Compact gradients against the dense masked gradients they replace."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import TrainerCallback

from sparse_rl import MaskedAdamW, SparseConfig, UnsupportedTrainerSetup, sparsify
from sparse_rl.discovery import random_mask
from sparse_rl.restrict import restrict_gradients
from sparse_rl.restrict.compact import clip_grad_norm_, compact_grad_of
from tests.trl_cases import TRAINERS, build_trainer, changed_entries, snapshot


def _backward(model, ids):
    model(input_ids=ids, labels=ids).loss.backward()


def _dense_and_compact(model, mask):
    dense, compact = model, copy.deepcopy(model)
    restrict_gradients(dense, mask)
    restrict_gradients(compact, mask, compact=True)
    return dense, compact


def test_holds_the_selected_entries_and_frees_the_dense_gradient(tiny_model):
    mask = random_mask(tiny_model, 0.2)
    dense, compact = _dense_and_compact(tiny_model, mask)
    ids = torch.randint(0, 20, (2, 6))
    for micro_batch in (ids[:, :5], ids[:, 1:], ids[:, 2:]):  # accumulation: later backwards add, as into .grad
        _backward(dense, micro_batch)
        _backward(compact, micro_batch)
    for (name, p_dense), (_, p_compact) in zip(dense.named_parameters(), compact.named_parameters()):
        if mask[name].all():
            assert compact_grad_of(p_compact) is None and torch.equal(p_compact.grad, p_dense.grad), name
            continue
        assert p_compact.grad is None, name
        assert torch.equal(compact_grad_of(p_compact), p_dense.grad[mask[name]]), name


def test_clipping_matches_torch_on_dense_masked_gradients(tiny_model):
    mask = random_mask(tiny_model, 0.1)
    dense, compact = _dense_and_compact(tiny_model, mask)
    ids = torch.randint(0, 20, (2, 6))
    _backward(dense, ids)
    _backward(compact, ids)
    expected = torch.nn.utils.clip_grad_norm_(dense.parameters(), max_norm=1e-3)
    norm = clip_grad_norm_(compact.parameters(), max_norm=1e-3)
    torch.testing.assert_close(norm, expected)
    assert float(norm) > 1e-3  # the clip did scale
    for (name, p_dense), (_, p_compact) in zip(dense.named_parameters(), compact.named_parameters()):
        got = p_compact.grad if p_compact.grad is not None else compact_grad_of(p_compact)
        torch.testing.assert_close(got, p_dense.grad[mask[name]] if p_compact.grad is None else p_dense.grad)


@pytest.mark.parametrize("state_bits", [32, 8])
def test_training_equals_dense_masked_gradients(tiny_model, state_bits):
    """Three steps of MaskedAdamW with two micro-batches each: the same parameters bit for bit, less gradient memory."""
    mask = random_mask(tiny_model, 0.1)
    dense, compact = _dense_and_compact(tiny_model, mask)
    optimizers = [MaskedAdamW(model.named_parameters(), mask, lr=1e-2, state_bits=state_bits, backend="cpu")
                  for model in (dense, compact)]
    ids = torch.randint(0, 20, (3, 2, 2, 6))
    for step in range(3):
        gradient_bytes = []
        for model, optimizer in zip((dense, compact), optimizers):
            for micro_batch in ids[step]:
                _backward(model, micro_batch)
            gradient_bytes.append(sum(g.numel() * g.element_size() for p in model.parameters()
                                      for g in (p.grad, compact_grad_of(p)) if g is not None))
            optimizer.step()
            optimizer.zero_grad()
        assert gradient_bytes[1] < 0.2 * gradient_bytes[0]
    for (name, p_dense), (_, p_compact) in zip(dense.named_parameters(), compact.named_parameters()):
        assert torch.equal(p_dense, p_compact), name
        assert compact_grad_of(p_compact) is None  # zero_grad dropped them


def test_step_consumes_what_model_zero_grad_leaves(tiny_model):
    """transformers.Trainer clears gradients with ``model.zero_grad()`` only, which resets ``.grad`` and leaves compact
    gradients: MaskedAdamW's step consumes them, so such a loop trains like one calling ``optimizer.zero_grad()``."""
    mask = random_mask(tiny_model, 0.1)
    models = [copy.deepcopy(tiny_model) for _ in range(2)]
    for model in models:
        restrict_gradients(model, mask, compact=True)
    optimizers = [MaskedAdamW(model.named_parameters(), mask, lr=1e-2, backend="cpu") for model in models]
    clear = [optimizers[0].zero_grad, models[1].zero_grad]
    ids = torch.randint(0, 20, (3, 2, 6))
    for step in range(3):
        for model, optimizer, zero_grad in zip(models, optimizers, clear):
            _backward(model, ids[step])
            optimizer.step()
            assert all(compact_grad_of(p) is None for p in model.parameters()), "the step left compact gradients"
            zero_grad()
    for (name, first), (_, second) in zip(*(model.named_parameters() for model in models)):
        assert torch.equal(first, second), name
    _backward(models[1], ids[0])
    models[1].zero_grad()
    assert any(compact_grad_of(p) is not None for p in models[1].parameters()), "model.zero_grad() cleared them"


def test_remove_restores_dense_gradients(tiny_model):
    mask = random_mask(tiny_model, 0.2)
    restriction = restrict_gradients(tiny_model, mask, compact=True)
    restriction.remove()
    _backward(tiny_model, torch.randint(0, 20, (2, 6)))
    assert all(p.grad is not None and not hasattr(p, "compact_grad") for p in tiny_model.parameters())


# ------------------------------------------------------------------------------------------------ with TRL trainers


class _GradientKinds(TrainerCallback):
    """What the optimizer is about to read for the partly selected parameters: dense or compact gradients."""

    def __init__(self, model, mask):
        self.params = [p for n, p in model.named_parameters() if mask[n].any() and not mask[n].all()]
        self.kinds = set()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for p in self.params:
            self.kinds.add("compact" if p.grad is None and compact_grad_of(p) is not None else
                           "dense" if p.grad is not None and compact_grad_of(p) is None else "neither")


@pytest.mark.parametrize("name", TRAINERS)
def test_trainers_match_dense_masked_gradients(name, tiny_checkpoint, tmp_path):
    """Each trainer, sparsified with and without compact_grads on the same mask: the same weights and logged
    grad_norm (clipping is active: max_grad_norm is below the gradient norm), and only selected entries move."""
    options = dict(max_grad_norm=0.05, gradient_accumulation_steps=2 if name in ("grpo", "sft") else 1)
    runs = {}
    for compact in (False, True):
        trainer = build_trainer(name, tiny_checkpoint, tmp_path / str(compact), **options)
        mask = random_mask(trainer.model, 0.1, seed=3)
        before = snapshot(trainer.model)
        sparsify(trainer, SparseConfig(mask=mask, compact_grads=compact))
        seen = _GradientKinds(trainer.model, mask)
        trainer.add_callback(seen)
        trainer.train()
        assert seen.kinds == ({"compact"} if compact else {"dense"})
        assert changed_entries(before, trainer.model, mask, selected=False) == 0
        runs[compact] = trainer
    norms = {c: [e["grad_norm"] for e in t.state.log_history if "grad_norm" in e] for c, t in runs.items()}
    assert len(norms[True]) == 2 and max(norms[True]) > 0.05  # clipped
    assert norms[True] == pytest.approx(norms[False], rel=1e-5)
    for (n, dense), (_, compact) in zip(runs[False].model.named_parameters(), runs[True].model.named_parameters()):
        torch.testing.assert_close(compact, dense, rtol=1e-5, atol=1e-7, msg=n)
    assert changed_entries(before, runs[True].model, mask, selected=True) > 0.25 * mask.num_selected


def test_refused_where_the_dense_gradient_is_needed(tiny_checkpoint, tmp_path, monkeypatch):
    trainer = build_trainer("sft", tiny_checkpoint, tmp_path)
    mask = random_mask(trainer.model, 0.1, seed=3)
    trainer.args.fp16 = True
    with pytest.raises(UnsupportedTrainerSetup, match="fp16"):
        sparsify(trainer, SparseConfig(mask=mask, compact_grads=True))
    trainer.args.fp16 = False
    monkeypatch.setattr(type(trainer.args), "world_size", property(lambda self: 2))
    with pytest.raises(UnsupportedTrainerSetup, match="single process, but this run has 2 processes"):
        sparsify(trainer, SparseConfig(mask=mask, compact_grads=True))
    assert all(not hasattr(p, "compact_grad") for p in trainer.model.parameters())  # refused before any change


def test_hooks_hold_a_bool_per_entry_or_an_index_per_selected_entry(tiny_model, monkeypatch):
    """Dense hooks keep a bool per entry; compact ones on CPU read the mask's packed bits and keep nothing, also after
    a backward (no compact backward asked for positions: the tiny model's head is untied and called densely); where
    the bits cannot be walked (other devices, no numba) they keep an int32 position per selected entry."""
    from sparse_rl.restrict import bitscan

    mask = random_mask(tiny_model, 0.1)
    partly = [n for n, _ in tiny_model.named_parameters() if mask[n].any() and not mask[n].all()]
    dense = restrict_gradients(tiny_model, mask)
    assert dense.held_bytes == sum(mask[n].numel() for n in partly)
    dense.remove()
    compact = restrict_gradients(tiny_model, mask, compact=True)
    tiny_model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    assert compact.held_bytes == 0 and all(compact_grad_of(p) is not None for n, p in tiny_model.named_parameters()
                                           if n in partly)
    compact.remove()
    monkeypatch.setattr(bitscan, "available", lambda: False)
    compact = restrict_gradients(tiny_model, mask, compact=True)
    assert compact.held_bytes == 4 * sum(int(mask[n].sum()) for n in partly) < 0.5 * dense_bytes(mask, partly)
    compact.remove()


def test_no_bool_per_entry_is_kept_with_compact_gradients_and_shared_reference(tiny_checkpoint, tmp_path):
    """With compact gradients and a shared reference, nothing sparse_rl keeps for training holds a bool per entry:
    the mask is packed, and on CPU the hooks and the reference walk its bits (no positions either)."""
    import gc

    trainer = build_trainer("dpo", tiny_checkpoint, tmp_path)
    sizes = {p.numel() for p in trainer.model.parameters()}
    sparse = sparsify(trainer, SparseConfig(density=0.1, discovery="random", compact_grads=True,
                                            shared_reference=True))
    gc.collect()
    kept = [t for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.dtype == torch.bool and t.numel() in sizes]
    assert kept == []
    assert sparse.mask.nbytes <= sum((n + 7) // 8 for n in (p.numel() for p in trainer.model.parameters()))
    assert sparse.restriction.held_bytes == 0  # on CPU the hooks and the reference read the mask's packed bits
    assert trainer.ref_model.extra_bytes() == trainer.ref_model.value_bytes()


def dense_bytes(mask, names):
    return sum(mask[n].numel() for n in names)


def test_on_by_default_where_supported_and_off_where_refused(tiny_checkpoint, tmp_path, monkeypatch):
    """compact_grads=None (the default) turns compact gradients on in one process and off, without a refusal, where
    an explicit compact_grads=True is refused."""
    trainer = build_trainer("sft", tiny_checkpoint, tmp_path)
    mask = random_mask(trainer.model, 0.1, seed=3)

    def sparsified_with_default() -> bool:
        sparse = sparsify(trainer, SparseConfig(mask=mask))
        holds_compact = [hasattr(p, "compact_grad") for p in trainer.model.parameters()]
        clip_patched = "clip_grad_norm_" in trainer.accelerator.__dict__
        assert any(holds_compact) == sparse.compact_grads == clip_patched
        sparse.remove()
        return sparse.compact_grads

    assert sparsified_with_default()
    trainer.args.fp16 = True
    assert not sparsified_with_default()
    trainer.args.fp16 = False
    monkeypatch.setattr(type(trainer.args), "world_size", property(lambda self: 2))
    assert not sparsified_with_default()


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("padding", [False, True])
def test_tied_embedding_matches_dense_bit_for_bit_without_its_dense_lookup_gradient(padding):
    """A tied input embedding / output head: the compact gradient equals the dense masked gradient bit for bit
    (accumulated over micro-batches, repeated tokens, padding rows), and the lookup never builds a dense gradient of
    the whole matrix (torch's embedding_dense_backward does not run)."""
    from tests.tiny import make_tiny_model

    model = make_tiny_model(tie_word_embeddings=True, vocab_size=40)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    if padding:
        model.get_input_embeddings().padding_idx = 0
    mask = random_mask(model, 0.3, seed=1)
    dense, compact = _dense_and_compact(model, mask)
    ids = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(0))
    ids[:, 2] = ids[:, 5] = 7  # repeated tokens: a row summed from several positions
    ids[0, :3] = 0  # padding tokens
    counter = _CountOps()
    for micro_batch in (ids[:, :6], ids[:, 2:], ids):
        _backward(dense, micro_batch)
        with counter:
            _backward(compact, micro_batch)
    assert not any("embedding_dense_backward" in call for call in counter.calls)
    name = next(n for n, p in compact.named_parameters() if p is compact.get_input_embeddings().weight)
    for (n, p_dense), (_, p_compact) in zip(dense.named_parameters(), compact.named_parameters()):
        expected = p_dense.grad[mask[n]]
        got = compact_grad_of(p_compact)
        assert got.view(torch.int32).equal(expected.view(torch.int32)), n  # bits, signed zeros included
    assert compact_grad_of(dict(compact.named_parameters())[name]).abs().sum() > 0
    with torch.no_grad():  # the reference forward and generation take the ordinary lookup
        assert torch.equal(compact(input_ids=ids).logits, dense(input_ids=ids).logits)


@pytest.mark.parametrize("name", ["dpo", "grpo"])
def test_trainers_with_a_tied_embedding_match_dense_masked_gradients_bit_for_bit(name, tmp_path):
    """DPO and GRPO on a model whose embedding is tied to the output head: compact gradients (with the compact
    lookup backward) train exactly the weights dense masked gradients train."""
    from tests.tiny import save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    trained = {}
    for compact in (False, True):
        trainer = build_trainer(name, checkpoint, tmp_path / str(compact))
        assert trainer.model.get_input_embeddings().weight is trainer.model.get_output_embeddings().weight
        mask = random_mask(trainer.model, 0.3, seed=3)
        sparsify(trainer, SparseConfig(mask=mask, compact_grads=compact))
        trainer.train()
        trained[compact] = dict(trainer.model.named_parameters())
    for n, dense in trained[False].items():
        assert torch.equal(trained[True][n], dense), n


class _DenseHeadGradients(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op output of the head weight's full shape (a dense gradient of the whole matrix)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.seen = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape:
            self.seen.append(str(func))
        return out


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("token_chunk", [4096, 8])
def test_fused_lm_head_matches_dense_without_a_dense_weight_gradient(tied, entropy, token_chunk, monkeypatch):
    """TRL's fused LM head (what DPO and GRPO call: the weight is read directly, ``lm_head`` never runs), tied and
    untied: the compact head backward gives the dense masked gradient, accumulated over micro-batches, with several
    vocab tiles and row blocks per tile, and no op produces a tensor of the whole weight's shape during
    backward. Bit for bit with one token chunk (TRL's default of 4096 tokens); with several, each block continues
    from the running sums with ``addmm_`` as TRL's full tile does, which sgemm on these tiny shapes rounds
    differently by block height (not at SmolLM2's shapes), so up to fp32 rounding there.
    ``SPARSE_RL_DENSE_HEAD=1`` keeps TRL's dense backward."""
    from trl.kernels import chunked_logprob
    from trl.trainer import utils as trl_utils

    from sparse_rl.restrict import compact_head
    from tests.tiny import make_tiny_model

    monkeypatch.setattr(chunked_logprob, "TOKEN_CHUNK_SIZE", token_chunk)
    monkeypatch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 16)
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", trl_utils._ChunkedLogProbFunction)
    model = make_tiny_model(tie_word_embeddings=tied, vocab_size=40)
    head = model.get_output_embeddings().weight
    # blocks of 8 rows: two per 16-row tile, one for the last tile (rows 32-40). (sgemm on these tiny shapes rounds
    # a 2-row block differently from the same rows in a 16-row product; blocks at SmolLM2's shapes are exact.)
    monkeypatch.setattr(compact_head, "BLOCK_BYTES", 8 * 4 * head.shape[1])
    if not tied:  # the untied input embedding's own dense gradient would have the head's shape
        model.get_input_embeddings().weight.requires_grad_(False)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy") if entropy else ("log_probs",))
    mask = random_mask(model, 0.3, seed=1)
    dense, compact = _dense_and_compact(model, mask)
    assert trl_utils._ChunkedLogProbFunction is compact_head._Dispatch
    ids = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(0))

    def backward(m, micro_batch):
        out = m(input_ids=micro_batch, labels=micro_batch, fused_lm_head=True)
        (out.loss + (out.entropy.mean() if entropy else 0)).backward()

    def head_of(m):
        return m.get_output_embeddings().weight

    recorder = _DenseHeadGradients(head.shape)
    for micro_batch in (ids[:, :6], ids[:, 2:], ids):
        backward(dense, micro_batch)
        with recorder:
            backward(compact, micro_batch)
    assert recorder.seen == []
    for (n, p_dense), (_, p_compact) in zip(dense.named_parameters(), compact.named_parameters()):
        if not p_compact.requires_grad:
            continue
        assert p_compact.grad is None, n
        got, expected = compact_grad_of(p_compact), p_dense.grad[mask[n]]
        if token_chunk > ids.numel() or p_compact is not head_of(compact):
            assert got.view(torch.int32).equal(expected.view(torch.int32)), n  # bits, signed zeros included
        else:
            torch.testing.assert_close(got, expected, rtol=4 * torch.finfo(torch.float32).eps, atol=1e-7, msg=n)
    assert compact_grad_of(head_of(compact)).abs().sum() > 0

    monkeypatch.setenv("SPARSE_RL_DENSE_HEAD", "1")
    recorder = _DenseHeadGradients(head.shape)
    with recorder:
        backward(compact, ids)
    assert recorder.seen  # TRL's dense weight gradient


def test_fused_lm_head_falls_back_to_trl_where_the_compact_backward_does_not_apply(monkeypatch):
    """Without compact hooks on the head (dense masked gradients, or none), TRL's own function runs and gives TRL's
    gradient; a TRL whose fused head is not the expected function is left alone."""
    from trl.trainer import utils as trl_utils

    from sparse_rl.restrict import compact_head

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", trl_utils._ChunkedLogProbFunction)
    assert compact_head.install_compact_fused_head()
    original = compact_head._original
    hidden, weight = torch.randn(5, 8, requires_grad=True), torch.nn.Parameter(torch.randn(12, 8))
    targets = torch.randint(0, 12, (5,))
    args = (None, targets, 1.0, 4, None, 1.0, ("log_probs",))
    trl_utils._ChunkedLogProbFunction.apply(hidden, weight, *args)[0].sum().backward()
    got = weight.grad.clone()
    weight.grad = None
    original.apply(hidden, weight, *args)[0].sum().backward()
    assert torch.equal(got, weight.grad)
    compact_head.uninstall_compact_fused_head()
    assert trl_utils._ChunkedLogProbFunction is original
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", object())
    assert not compact_head.install_compact_fused_head()
