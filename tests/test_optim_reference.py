"""A plain PyTorch reference of the masked AdamW step, and the tests that tie it to ``torch.optim.AdamW``.

The reference performs exactly the kernels' fp32 operations, each one correctly rounded: it computes every operation
in float64 and rounds to float32 (for +, -, *, / and sqrt of fp32 inputs, float64 then fp32 rounding is exact). Plain
fp32 torch ops would not do: on this CPU ``torch.sqrt`` of fp32 is not correctly rounded. The kernels can then be
required to match it bit for bit.
"""

from __future__ import annotations

import torch
from sparse_rl.kernels.layout import AdamWScalars

from sparse_rl import MaskedAdamW, SubnetworkMask


def _round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).to(torch.float64)


def reference_adamw(value, grad, exp_avg, exp_avg_sq, s: AdamWScalars):
    """One AdamW update of fp32 vectors, each operation rounded to fp32 once. Returns (value, exp_avg, exp_avg_sq)."""
    value, grad, exp_avg, exp_avg_sq = (t.to(torch.float64) for t in (value, grad, exp_avg, exp_avg_sq))
    exp_avg = _round(_round(exp_avg * s.beta1) + _round(grad * s.one_minus_beta1))
    exp_avg_sq = _round(_round(exp_avg_sq * s.beta2) + _round(_round(grad * grad) * s.one_minus_beta2))
    denom = _round(_round(_round(exp_avg_sq.sqrt()) / s.bias_correction2_sqrt) + s.eps)
    value = _round(_round(value * s.decay) - _round(s.step_size * _round(exp_avg / denom)))
    return value.float(), exp_avg.float(), exp_avg_sq.float()


class ReferenceMaskedAdamW:
    """Masked AdamW over named tensors with compact fp32 state, written with boolean indexing."""

    def __init__(self, params: dict[str, torch.Tensor], mask: SubnetworkMask, *, lr, betas, eps, weight_decay,
                 master_weights=True):
        self.params, self.mask = params, mask
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.state = {}
        for name, p in params.items():
            k = int(mask[name].sum())
            state = {"step": 0, "exp_avg": torch.zeros(k), "exp_avg_sq": torch.zeros(k)}
            if master_weights and p.dtype != torch.float32:
                state["master"] = p.detach().reshape(-1)[mask[name].reshape(-1)].float()
            self.state[name] = state

    def step(self, grads: dict[str, torch.Tensor]) -> None:
        for name, p in self.params.items():
            selection = self.mask[name].reshape(-1)
            if not selection.any():
                continue
            state = self.state[name]
            state["step"] += 1
            s = AdamWScalars.for_step(lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], eps=self.eps,
                                      weight_decay=self.weight_decay, step=state["step"])
            flat = p.detach().view(-1)
            value = state["master"] if "master" in state else flat[selection].float()
            value, state["exp_avg"], state["exp_avg_sq"] = reference_adamw(
                value, grads[name].reshape(-1)[selection].float(), state["exp_avg"], state["exp_avg_sq"], s)
            if "master" in state:
                state["master"] = value
            flat[selection] = value.to(p.dtype)  # torch's fp32 -> bf16/fp16 cast rounds to nearest even


def random_problem(shapes: dict[str, tuple], density: float, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}
    mask = SubnetworkMask({n: torch.rand(s, generator=g) < density for n, s in shapes.items()})
    return params, mask


def random_grads(params: dict[str, torch.Tensor], steps: int, seed: int = 1, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return [{n: (torch.randn(p.shape, generator=g) * scale).to(p.dtype) for n, p in params.items()}
            for _ in range(steps)]


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit-for-bit equality with the first mismatching entries in the message."""
    a, e = actual.detach().reshape(-1), expected.detach().reshape(-1)
    if a.dtype.itemsize == 2:
        a_bits, e_bits = a.view(torch.int16), e.view(torch.int16)
    elif a.dtype.itemsize == 4:
        a_bits, e_bits = a.view(torch.int32), e.view(torch.int32)
    else:
        a_bits, e_bits = a, e
    bad = (a_bits != e_bits).nonzero().squeeze(1)
    if bad.numel():
        first = bad[:5].tolist()
        raise AssertionError(f"{what}: {bad.numel()}/{a.numel()} entries differ, e.g. at {first}: "
                             f"{a[first].tolist()} != {e[first].tolist()}")


# ---------------------------------------------------------------------------------------------------- tests
def test_reference_matches_torch_adamw_on_a_full_mask():
    """The reference is AdamW: on a full mask it follows torch.optim.AdamW to a few fp32 ulps over many steps."""
    params, _ = random_problem({"w": (64, 33)}, 1.0)
    mask = SubnetworkMask.full(params.items())
    dense = torch.nn.Parameter(params["w"].clone())
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    reference = ReferenceMaskedAdamW(params, mask, **hyper)
    torch_adamw = torch.optim.AdamW([dense], foreach=False, **hyper)
    for grads in random_grads(params, 20):
        reference.step(grads)
        dense.grad = grads["w"].clone()
        torch_adamw.step()
    torch.testing.assert_close(params["w"], dense.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(reference.state["w"]["exp_avg_sq"], torch_adamw.state[dense]["exp_avg_sq"].reshape(-1),
                               atol=0, rtol=1e-6)


def test_masked_adamw_matches_torch_adamw_with_param_groups_and_lr_schedule():
    """Different lr/weight decay per group and an LR scheduler behave as in torch.optim.AdamW."""
    params, mask = random_problem({"a": (40, 30), "b": (77,)}, 0.4)
    ours = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    theirs = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    groups = lambda ps, named: [
        {"params": [ps["a"]], **({"param_names": ["a"]} if named else {}), "lr": 1e-2, "weight_decay": 0.1},
        {"params": [ps["b"]], **({"param_names": ["b"]} if named else {}), "lr": 3e-3, "weight_decay": 0.0},
    ]
    optimizer = MaskedAdamW(groups(ours, True), mask, betas=(0.9, 0.95))
    torch_adamw = torch.optim.AdamW(groups(theirs, False), betas=(0.9, 0.95), foreach=False)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step)) for o in (optimizer, torch_adamw)]
    for grads in random_grads(params, 6):
        for n in params:
            ours[n].grad = grads[n].clone()
            theirs[n].grad = grads[n].clone() * mask[n]
        optimizer.step()
        torch_adamw.step()
        for schedule in schedules:
            schedule.step()
        optimizer.zero_grad()
        assert all(p.grad is None for p in ours.values())
    for n in params:
        selected = mask[n]
        torch.testing.assert_close(ours[n].detach()[selected], theirs[n].detach()[selected], atol=1e-6, rtol=1e-6)
        assert torch.equal(ours[n].detach()[~selected], params[n][~selected])
