"""``MaskedAdamW``: AdamW on the selected entries only, with compact optimizer state.

For a parameter with ``k`` selected entries out of ``n``, the state is ``exp_avg`` and ``exp_avg_sq`` of length ``k``
(fp32), plus an fp32 ``master`` copy of the ``k`` entries when the parameter is stored in bf16/fp16 (at RL learning
rates most updates are below half a bf16 ulp and would be rounded away). Unselected entries are never written.

The arithmetic lives in ``_apply_adamw_to_selected``; the optimizer class only owns bookkeeping (param groups, state,
checkpoints), so a faster backend (Triton on CUDA, a fused CPU loop) can replace the arithmetic alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .mask import SubnetworkMask

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _apply_adamw_to_selected(
    param: torch.Tensor,
    grad: torch.Tensor,
    selected_index: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    master: torch.Tensor | None,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Plain PyTorch AdamW on ``param.view(-1)[selected_index]``, in the same operation order as ``torch.optim.AdamW``
    (single-tensor path), so fp32 results agree with it to rounding."""
    flat_param = param.view(-1)
    selected_grad = grad.reshape(-1).index_select(0, selected_index).float()
    values = master if master is not None else flat_param.index_select(0, selected_index)
    if weight_decay != 0.0:
        values.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(selected_grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(selected_grad, selected_grad, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    values.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    flat_param.index_copy_(0, selected_index, values.to(param.dtype))


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW that updates only the entries selected by a :class:`SubnetworkMask`.

    Args:
        named_params: ``model.named_parameters()`` (or param-group dicts with ``params`` and ``param_names``); the
            names are how each tensor finds its selection in ``mask``.
        mask: the subnetwork. Every optimised parameter must be in it.
        master_weights: keep an fp32 copy of the selected entries of bf16/fp16 parameters.
    """

    def __init__(
        self,
        named_params: Iterable,
        mask: SubnetworkMask,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        master_weights: bool = True,
    ):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid betas: {betas}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        groups = _as_named_groups(named_params)
        super().__init__(groups, defaults)
        self.mask = mask
        self.master_weights = master_weights
        self._selected_index: dict[torch.Tensor, torch.Tensor] = {}
        for group in self.param_groups:
            if "param_names" not in group:
                raise ValueError("MaskedAdamW needs parameter names: pass model.named_parameters()")
            for name, param in zip(group["param_names"], group["params"]):
                if name not in mask:
                    raise ValueError(f"parameter {name!r} is optimised but absent from the mask; "
                                     "freeze it (requires_grad=False) or add it to the mask")
                selection = mask[name]
                if tuple(selection.shape) != tuple(param.shape):
                    raise ValueError(f"mask for {name!r} has shape {tuple(selection.shape)} but the parameter has "
                                     f"shape {tuple(param.shape)}")
                self._selected_index[param] = selection.reshape(-1).nonzero().squeeze(1).to(param.device)

    # ------------------------------------------------------------------ state
    def _init_state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            index = self._selected_index[param]
            k = index.numel()
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros(k, dtype=torch.float32, device=param.device)
            state["exp_avg_sq"] = torch.zeros(k, dtype=torch.float32, device=param.device)
            if self.master_weights and param.dtype in _LOW_PRECISION:
                state["master"] = param.detach().reshape(-1).index_select(0, index).float()
        return state

    def state_bytes(self) -> int:
        """Bytes held by optimizer state (moments, master copies) and selection indices."""
        total = sum(t.numel() * t.element_size() for t in self._selected_index.values())
        for state in self.state.values():
            total += sum(v.numel() * v.element_size() for k, v in state.items() if torch.is_tensor(v) and k != "step")
        return total

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("MaskedAdamW does not support sparse gradients")
                index = self._selected_index[param]
                if index.numel() == 0:
                    continue
                state = self._init_state(param)
                state["step"] += 1
                _apply_adamw_to_selected(
                    param, param.grad, index, state["exp_avg"], state["exp_avg_sq"], state.get("master"),
                    step=int(state["step"].item()), lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"],
                )
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Load exactly: ``torch.optim.Optimizer.load_state_dict`` casts every state tensor to its parameter's dtype,
        which would turn fp32 moments of a bf16 parameter into bf16. We restore the saved dtypes afterwards."""
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, param in zip(saved_ids, params):
            if saved_id not in saved_state:
                continue
            for key, value in saved_state[saved_id].items():
                if torch.is_tensor(value):
                    device = value.device if key == "step" else param.device
                    self.state[param][key] = value.detach().clone().to(device)
            index = self._selected_index[param]
            if self.state[param]["exp_avg"].numel() != index.numel():
                raise ValueError(f"optimizer state for a parameter has {self.state[param]['exp_avg'].numel()} "
                                 f"entries but the mask selects {index.numel()}: the checkpoint was saved with a "
                                 "different mask")


def _as_named_groups(named_params: Iterable) -> list[dict]:
    items = list(named_params)
    if not items:
        raise ValueError("MaskedAdamW got an empty parameter list")
    if isinstance(items[0], dict):
        return items
    if isinstance(items[0], tuple) and len(items[0]) == 2 and isinstance(items[0][0], str):
        return [{"params": [p for _, p in items], "param_names": [n for n, _ in items]}]
    raise TypeError("MaskedAdamW expects model.named_parameters() or param-group dicts with 'param_names'")
