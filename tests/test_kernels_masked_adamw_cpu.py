"""The numba CPU path at sizes the small kernel tests do not reach: its parallel launch, batches spanning many tiles,
dense and sparse tile decoding, launch tables cached across steps, and torch's thread count left as it was.

Every case is compared bit for bit against the plain PyTorch reference (tests/test_optim_reference.py).
"""

from __future__ import annotations

import pytest
import torch
from sparse_rl.kernels.layout import TILE

from sparse_rl import MaskedAdamW, SubnetworkMask
from tests.test_kernels_masked_adamw import _assert_matches_reference, _run_both
from tests.test_optim_reference import ReferenceMaskedAdamW, random_grads, random_problem

# Over the serial threshold (256 tiles); sparse (1%: most words empty), mid (10%) and dense (60%: several batches of
# 2048 entries per tensor) tiles; a tensor ending inside a tile.
SHAPES = {"sparse": (300 * TILE,), "mid": (70, 3 * TILE + 5), "dense": (20 * TILE + 333,), "small": (17, 3)}


@pytest.fixture(params=["general", "blocks"])
def cpu_path(request, monkeypatch):
    """Both CPU paths: the general one, and the AVX-512 block path that fp32 parameters take where the CPU has it."""
    from sparse_rl.kernels.masked_adamw_cpu_blocks import block_path_available

    monkeypatch.setenv("SPARSE_RL_CPU_BLOCKS", "1" if request.param == "blocks" else "0")
    if request.param == "blocks" and not block_path_available():
        pytest.skip("this CPU has no AVX-512: the block path is not used here")
    return request.param


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype,master_weights", [(torch.float32, True), (torch.bfloat16, True),
                                                  (torch.float16, False)], ids=str)
def test_parallel_launch_matches_reference(two_threads, cpu_path, dtype, master_weights):
    params, mask = random_problem(SHAPES, 0.1, dtype)
    mask = SubnetworkMask({**mask.selections, **{
        name: torch.rand(SHAPES[name], generator=torch.Generator().manual_seed(3)) < density
        for name, density in (("sparse", 0.01), ("dense", 0.6))}})
    start = {n: p.clone() for n, p in params.items()}
    ours, theirs, opt, ref = _run_both(params, mask, random_grads(params, 2), backend="cpu",
                                       master_weights=master_weights, lrs=[1e-2, 3e-3])
    _assert_matches_reference(ours, theirs, opt, ref, mask, start)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("state_bits", [32, 8])
def test_tables_follow_new_gradient_parameter_and_state_tensors(cpu_path, state_bits):
    """Fresh gradient tensors every step (zero_grad(set_to_none=True)), a parameter rebound to new storage and state
    loaded from a checkpoint all change addresses in the cached launch table: the step must follow each of them."""
    if state_bits == 8:
        pytest.importorskip("bitsandbytes")
    params, mask = random_problem({"w": (40, 60), "v": (3 * TILE,)}, 0.3)
    grads = random_grads(params, 4)
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ours = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    optimizer = MaskedAdamW(ours.items(), mask, state_bits=state_bits, backend="cpu", **hyper)
    expected = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    if state_bits == 8:  # 8-bit has no plain reference: the same optimizer without any address change is one
        reference = MaskedAdamW(expected.items(), mask, state_bits=8, backend="cpu", **hyper)
    else:
        reference = ReferenceMaskedAdamW(expected, mask, master_weights=True, **hyper)
    for step, step_grads in enumerate(grads):
        for n, p in ours.items():
            p.grad = step_grads[n].clone()  # a new tensor, new address
        if step == 1:
            ours["w"].data = ours["w"].data.clone()  # the parameter moves
        if step == 2:
            optimizer.load_state_dict(optimizer.state_dict())  # the state tensors are replaced
        optimizer.step()
        if state_bits == 8:
            for n, p in expected.items():
                p.grad = step_grads[n].clone()
            reference.step()
        else:
            reference.step(step_grads)
    for n in params:
        assert torch.equal(ours[n].detach().view(torch.int32), expected[n].detach().view(torch.int32)), n


def test_launch_uses_torch_threads_and_leaves_torch_count_alone(two_threads, cpu_path, monkeypatch):
    """The parallel launch runs on torch's thread count. numba's OpenMP pool sets the process's OpenMP thread count
    (torch's too) to all cores at its first parallel launch; the launch must put torch's back, as it was set."""
    import numba
    from sparse_rl.kernels import masked_adamw_cpu, masked_adamw_cpu_blocks

    module = masked_adamw_cpu_blocks if cpu_path == "blocks" else masked_adamw_cpu
    seen = {}
    real = module._step_parallel

    def first_launch(*args):
        seen["numba_threads"] = numba.get_num_threads()
        torch.set_num_threads(1)  # what starting numba's pool does to torch, on a machine with another core count
        return real(*args)

    monkeypatch.setattr(module, "_step_parallel", first_launch)
    p = torch.nn.Parameter(torch.randn(400 * TILE))
    optimizer = MaskedAdamW([("p", p)], random_problem({"p": p.shape}, 0.1)[1], backend="cpu")
    p.grad = torch.randn_like(p)
    optimizer.step()
    assert seen["numba_threads"] == min(2, numba.config.NUMBA_NUM_THREADS)
    assert torch.get_num_threads() == 2
