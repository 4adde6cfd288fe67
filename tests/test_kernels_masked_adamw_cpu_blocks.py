"""The AVX-512 block path of the CPU step (fp32 parameters) against the general CPU path and the PyTorch reference.

Bit for bit: the moments, the parameters, and the unselected entries (seeded with NaN payloads, -0.0 and infinities,
which any float arithmetic or a lane mix-up would change). Shapes cover tensors shorter than one 16-entry block,
sizes that end inside a block and inside a tile (the entry-by-entry tail), batches cut by the parallel chunking, and
empty and full masks; gradients dense and compact; several steps with a changing learning rate; 1 and 2 threads.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sparse_rl.kernels.layout import TILE
from sparse_rl.kernels.masked_adamw_cpu_blocks import block_path_available

from sparse_rl import MaskedAdamW, SubnetworkMask
from tests.test_optim_reference import ReferenceMaskedAdamW

pytestmark = pytest.mark.skipif(not block_path_available(), reason="this CPU has no AVX-512: no block path here")

HYPER = dict(betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
ODD_BITS = torch.tensor([0x7FC00001, 0x7F800001, 0xFF812345, 0x80000000, 0x7F800000, 0xFF800000],
                        dtype=torch.int64).to(torch.int32)  # quiet/signalling NaN payloads, -0.0, +-inf


def _problem(shapes, densities, seed):
    generator = torch.Generator().manual_seed(seed)
    params, selections = {}, {}
    for i, (shape, density) in enumerate(zip(shapes, densities)):
        name = f"t{i}"
        selection = torch.rand(shape, generator=generator) < density
        value = torch.randn(shape, generator=generator)
        flat_bits = value.view(-1).view(torch.int32)
        unselected = (~selection).view(-1).nonzero().squeeze(1)
        odd = unselected[torch.randperm(unselected.numel(), generator=generator)[:ODD_BITS.numel()]]
        flat_bits[odd] = ODD_BITS[: odd.numel()]
        params[name], selections[name] = value, selection
    grads = [{n: torch.randn(p.shape, generator=generator) for n, p in params.items()} for _ in range(3)]
    return params, SubnetworkMask(selections), grads


def _run(params, mask, grads, lrs, *, compact, path, monkeypatch):
    monkeypatch.setenv("SPARSE_RL_CPU_BLOCKS", "1" if path == "blocks" else "0")
    ours = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    optimizer = MaskedAdamW(ours.items(), mask, backend="cpu", lr=lrs[0], **HYPER)
    for lr, step_grads in zip(lrs, grads):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for n, p in ours.items():
            if compact:
                p.grad, p.compact_grad = None, step_grads[n][mask[n]].clone()
            else:
                p.grad = step_grads[n].clone()
        optimizer.step()
    moments = {n: (optimizer.state[p]["exp_avg"].clone(), optimizer.state[p]["exp_avg_sq"].clone())
               for n, p in ours.items() if p in optimizer.state and "exp_avg" in optimizer.state[p]}
    return {n: p.detach().clone() for n, p in ours.items()}, moments


def _bits(t):
    return t.contiguous().view(torch.int32)


def _check(params, mask, grads, lrs, compact, monkeypatch):
    blocks, block_moments = _run(params, mask, grads, lrs, compact=compact, path="blocks", monkeypatch=monkeypatch)
    general, general_moments = _run(params, mask, grads, lrs, compact=compact, path="general",
                                    monkeypatch=monkeypatch)
    reference = ReferenceMaskedAdamW({n: p.clone() for n, p in params.items()}, mask, lr=lrs[0], **HYPER)
    for lr, step_grads in zip(lrs, grads):
        reference.lr = lr
        reference.step(step_grads)
    for n in params:
        assert torch.equal(_bits(blocks[n]), _bits(general[n])), f"{n}: block path != general path"
        assert torch.equal(_bits(blocks[n]), _bits(reference.params[n])), f"{n}: block path != reference"
        unselected = ~mask[n]
        assert torch.equal(_bits(blocks[n])[unselected], _bits(params[n])[unselected]), f"{n}: unselected changed"
    assert block_moments.keys() == general_moments.keys()
    for n, (m, v) in block_moments.items():
        assert torch.equal(_bits(m), _bits(general_moments[n][0])), n
        assert torch.equal(_bits(v), _bits(general_moments[n][1])), n
        assert torch.equal(_bits(m), _bits(reference.state[n]["exp_avg"])), n
        assert torch.equal(_bits(v), _bits(reference.state[n]["exp_avg_sq"])), n


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("compact", [False, True], ids=["dense-grads", "compact-grads"])
def test_block_path_matches_general_path_and_reference(threads, compact, monkeypatch):
    """Sizes over the serial threshold (parallel chunks of 64 work tiles), with tails in a block and in a tile."""
    shapes = [(300 * TILE + 7,), (70, 3 * TILE + 5), (20 * TILE + 333,), (17, 3), (5,), (4, 16)]
    densities = [0.01, 0.1, 0.6, 0.5, 1.0, 0.0]
    params, mask, grads = _problem(shapes, densities, seed=threads + 2 * compact)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(params, mask, grads, [1e-2, 3e-3, 1e-3], compact, monkeypatch)
    finally:
        torch.set_num_threads(previous)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 3 * TILE + 40), min_size=1, max_size=4),
       density=st.sampled_from([0.0, 0.003, 0.05, 0.3, 0.9, 1.0]), compact=st.booleans(), seed=st.integers(0, 99))
def test_block_path_property(sizes, density, compact, seed, monkeypatch):
    params, mask, grads = _problem([(n,) for n in sizes], [density] * len(sizes), seed)
    _check(params, mask, grads[:2], [1e-2, 2e-3], compact, monkeypatch)
