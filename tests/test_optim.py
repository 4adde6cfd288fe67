import copy

import pytest
import torch

from sparse_rl import MaskedAdamW, SubnetworkMask

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def _named_tensors(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (17, 33), "b.weight": (64,), "c.bias": (5, 3, 2)}
    return {n: torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for n, s in shapes.items()}


def _mask(params, density, seed=1):
    g = torch.Generator().manual_seed(seed)
    return SubnetworkMask({n: torch.rand(p.shape, generator=g) < density for n, p in params.items()})


def _grads(params, steps, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(p.shape, generator=g).to(p.dtype) for n, p in params.items()} for _ in range(steps)]


def test_matches_torch_adamw_on_selected_entries_fp32():
    params = _named_tensors()
    reference = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    start = {n: p.detach().clone() for n, p in params.items()}
    mask = _mask(params, 0.3)
    masked = MaskedAdamW(params.items(), mask, **HYPER)
    dense = torch.optim.AdamW(reference.values(), foreach=False, **HYPER)
    for grads in _grads(params, 5):
        for n in params:
            params[n].grad = grads[n].clone()
            reference[n].grad = grads[n].clone()
        masked.step()
        dense.step()
    for n, p in params.items():
        sel = mask[n]
        torch.testing.assert_close(p.detach()[sel], reference[n].detach()[sel], atol=1e-6, rtol=0)
        assert torch.equal(p.detach()[~sel], start[n][~sel]), "unselected entries must stay bit-identical"
        assert not torch.equal(p.detach()[sel], start[n][sel])


def test_state_is_compact():
    params = _named_tensors()
    mask = _mask(params, 0.1)
    opt = MaskedAdamW(params.items(), mask, **HYPER)
    for p in params.values():
        p.grad = torch.ones_like(p)
    opt.step()
    for n, p in params.items():
        assert opt.state[p]["exp_avg"].numel() == int(mask[n].sum())
        assert opt.state[p]["exp_avg_sq"].numel() == int(mask[n].sum())


def test_bf16_master_weights_keep_tiny_updates():
    p = torch.nn.Parameter(torch.full((1000,), 4.0, dtype=torch.bfloat16))
    mask = SubnetworkMask({"w": torch.ones(1000, dtype=torch.bool)})
    opt = MaskedAdamW([("w", p)], mask, lr=1e-4, weight_decay=0.0)
    for _ in range(200):  # each update (1e-4) is far below half a bf16 ulp at 4.0 (0.0156)
        p.grad = torch.ones_like(p)
        opt.step()
    master = opt.state[p]["master"]
    assert master.dtype == torch.float32
    # 200 fp32 roundings at 4.0 cost at most 200 * 2.4e-7; the signal is 0.02
    torch.testing.assert_close(master, torch.full((1000,), 4.0 - 200 * 1e-4), atol=1e-4, rtol=0)
    assert torch.equal(p.detach(), master.to(torch.bfloat16))
    assert float(p.detach()[0]) < 4.0

    # without the master copy every update is rounded away
    q = torch.nn.Parameter(torch.full((1000,), 4.0, dtype=torch.bfloat16))
    opt = MaskedAdamW([("w", q)], mask, lr=1e-4, weight_decay=0.0, master_weights=False)
    for _ in range(200):
        q.grad = torch.ones_like(q)
        opt.step()
    assert torch.all(q.detach() == 4.0)


def test_state_dict_round_trip_keeps_fp32_state_of_bf16_params():
    params = _named_tensors(dtype=torch.bfloat16)
    mask = _mask(params, 0.5)
    opt = MaskedAdamW(params.items(), mask, **HYPER)
    grads = _grads(params, 4)
    for g in grads[:2]:
        for n, p in params.items():
            p.grad = g[n]
        opt.step()
    saved = copy.deepcopy(opt.state_dict())  # as torch.save would freeze it
    snapshot = {n: p.detach().clone() for n, p in params.items()}

    for g in grads[2:]:
        for n, p in params.items():
            p.grad = g[n]
        opt.step()
    uninterrupted = {n: p.detach().clone() for n, p in params.items()}

    for n, p in params.items():
        p.data.copy_(snapshot[n])
    resumed = MaskedAdamW(params.items(), mask, **HYPER)
    resumed.load_state_dict(saved)
    for p in params.values():
        assert resumed.state[p]["exp_avg"].dtype == torch.float32
        assert resumed.state[p]["master"].dtype == torch.float32
    for g in grads[2:]:
        for n, p in params.items():
            p.grad = g[n]
        resumed.step()
    for n, p in params.items():
        assert torch.equal(p.detach(), uninterrupted[n]), n


def test_errors_name_the_parameter():
    params = _named_tensors()
    with pytest.raises(ValueError, match="b.weight.*absent from the mask"):
        MaskedAdamW(params.items(), SubnetworkMask({"a.weight": torch.ones(17, 33, dtype=torch.bool),
                                                    "c.bias": torch.ones(5, 3, 2, dtype=torch.bool)}))
    bad = {n: torch.ones(3, dtype=torch.bool) for n in params}
    with pytest.raises(ValueError, match="a.weight.*shape"):
        MaskedAdamW(params.items(), SubnetworkMask(bad))
    with pytest.raises(ValueError, match="named_parameters|param_names"):
        MaskedAdamW([{"params": list(params.values())}], _mask(params, 0.5))
