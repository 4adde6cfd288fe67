"""MaskedAdamW checkpoints, wrappers, dispatch and error messages."""

from __future__ import annotations

import io

import pytest
import torch

from sparse_rl import MaskedAdamW, SubnetworkMask
from tests.test_optim_reference import assert_bits_equal, random_grads, random_problem

CONFIGS = {
    "fp32": dict(dtype=torch.float32),
    "bf16_master": dict(dtype=torch.bfloat16),
    "fp16_stochastic": dict(dtype=torch.float16, master_weights=False, stochastic_rounding=True),
    "bf16_8bit": dict(dtype=torch.bfloat16, state_bits=8),
}


def _optimizer(params, mask, backend="cpu", **options):
    options = {k: v for k, v in options.items() if k != "dtype"}
    return MaskedAdamW(params.items(), mask, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, backend=backend, **options)


def _steps(optimizer, params, grads):
    for g in grads:
        for n, p in params.items():
            p.grad = g[n].clone()
        optimizer.step()


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_save_load_continue_equals_uninterrupted(config):
    options = CONFIGS[config]
    start, mask = random_problem({"a": (40, 30), "b": (1500,)}, 0.3, options["dtype"])
    grads = random_grads(start, 5)

    params = {n: torch.nn.Parameter(p.clone()) for n, p in start.items()}
    optimizer = _optimizer(params, mask, **options)
    _steps(optimizer, params, grads)
    uninterrupted = {n: p.detach().clone() for n, p in params.items()}

    params = {n: torch.nn.Parameter(p.clone()) for n, p in start.items()}
    optimizer = _optimizer(params, mask, **options)
    _steps(optimizer, params, grads[:2])
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "params": {n: p.detach() for n, p in params.items()}}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed_params = {n: torch.nn.Parameter(p.clone()) for n, p in checkpoint["params"].items()}
    resumed = _optimizer(resumed_params, mask, **options)
    resumed.load_state_dict(checkpoint["optimizer"])
    for p in resumed_params.values():
        for key, value in optimizer.state[params[_name(params, p, resumed_params)]].items():
            assert resumed.state[p][key].dtype == value.dtype, key
            assert_bits_equal(resumed.state[p][key], value, key)
    _steps(resumed, resumed_params, grads[2:])
    for n in start:
        assert_bits_equal(resumed_params[n], uninterrupted[n], f"{config} {n}")


def _name(params, p, resumed_params):
    return next(n for n, q in resumed_params.items() if q is p)


def test_accelerated_optimizer_round_trip_keeps_state_exact():
    """accelerate's AcceleratedOptimizer round-trips state_dict at prepare time; steps must equal the bare ones."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    start, mask = random_problem({"a": (40, 30), "b": (300,)}, 0.5, torch.bfloat16)
    grads = random_grads(start, 4)
    results = []
    for wrap in (False, True):
        params = {n: torch.nn.Parameter(p.clone()) for n, p in start.items()}
        optimizer = _optimizer(params, mask, state_bits=8)
        _steps(optimizer, params, grads[:2])
        try:
            if wrap:  # prepare() round-trips state_dict once; a checkpoint resume does it again
                optimizer = Accelerator(cpu=True).prepare_optimizer(optimizer)
                assert isinstance(optimizer, AcceleratedOptimizer)
                optimizer.load_state_dict(optimizer.state_dict())
                assert all(s["exp_avg"].dtype == torch.uint8 and s["master"].dtype == torch.float32
                           for s in optimizer.optimizer.state.values())
            _steps(optimizer, params, grads[2:])
        finally:
            if wrap:
                AcceleratorState._reset_state(reset_partial_state=True)
        results.append(params)
    for n in start:
        assert_bits_equal(results[1][n], results[0][n], n)


def test_checkpoint_from_another_configuration_is_refused():
    start, mask = random_problem({"a": (40, 30)}, 0.3)
    params = {n: torch.nn.Parameter(p.clone()) for n, p in start.items()}
    optimizer = _optimizer(params, mask)
    _steps(optimizer, params, random_grads(start, 1))
    saved = optimizer.state_dict()
    with pytest.raises(ValueError, match="'a'.*state_bits"):
        _optimizer(params, mask, state_bits=8).load_state_dict(saved)
    other_mask = SubnetworkMask({"a": ~mask["a"]})
    with pytest.raises(ValueError, match="'a'.*different mask"):
        _optimizer(params, other_mask).load_state_dict(saved)


def test_bad_options_raise_clear_errors(monkeypatch):
    params, mask = random_problem({"a": (4, 4)}, 0.5)
    with pytest.raises(ValueError, match="master_weights=False"):
        _optimizer(params, mask, stochastic_rounding=True)
    with pytest.raises(ValueError, match="state_bits"):
        _optimizer(params, mask, state_bits=4)
    with pytest.raises(ValueError, match="backend"):
        _optimizer(params, mask, backend="cuda")
    with pytest.raises(TypeError, match="'a'.*dtype"):
        _optimizer({"a": torch.zeros(4, 4, dtype=torch.float64)}, mask)
    with pytest.raises(ValueError, match="'a'.*contiguous"):
        _optimizer({"a": torch.zeros(4, 4).t()}, mask)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = torch.nn.Parameter(params["a"].clone())
    optimizer = _optimizer({"a": p}, mask, backend="triton")
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        optimizer.step()


def test_parameters_without_grad_are_skipped_and_keep_their_step_count():
    start, mask = random_problem({"a": (40, 30), "b": (300,)}, 0.5)
    params = {n: torch.nn.Parameter(p.clone()) for n, p in start.items()}
    optimizer = _optimizer(params, mask)
    _steps(optimizer, params, random_grads(start, 2))
    params["b"].grad = None
    params["a"].grad = torch.randn_like(params["a"])
    before = params["b"].detach().clone()
    optimizer.step()
    assert torch.equal(params["b"].detach(), before)
    assert optimizer.state[params["a"]]["step"].item() == 3 and optimizer.state[params["b"]]["step"].item() == 2
    params["b"].grad = torch.randn_like(params["b"])
    optimizer.step()  # the two tensors now sit at different step counts: two launches with their own bias corrections
    assert optimizer.state[params["b"]]["step"].item() == 3


@pytest.mark.parametrize("state_bits,budget", [(32, 0.15), (8, 0.05)])
def test_state_bytes_at_density_ten_percent(state_bits, budget):
    """state_bytes() counts everything the optimizer holds, layout included, against torch AdamW's 8 bytes/param."""
    shapes = {"w": (576, 1536), "v": (192, 576)}
    params, mask = random_problem(shapes, 0.1)
    params = {n: torch.nn.Parameter(p) for n, p in params.items()}
    optimizer = _optimizer(params, mask, state_bits=state_bits)
    _steps(optimizer, params, random_grads(params, 1))
    dense_state = sum(p.numel() for p in params.values()) * 8
    assert optimizer.state_bytes() <= budget * dense_state
