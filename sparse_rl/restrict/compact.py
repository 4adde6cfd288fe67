"""Compact gradients: keep only the subnetwork's gradient entries, and free the dense gradient during backward.

With a 10% mask, 90% of a dense ``.grad`` is zeros that :class:`~sparse_rl.optim.MaskedAdamW` never reads, yet they
cost 4 bytes per parameter (as much as the fp32 weights) and a read of the whole tensor at every step. Here a
post-accumulate-grad hook copies the selected entries of each gradient, in flat order (the slot order of the
optimizer's compact state), into ``param.compact_grad`` as soon as autograd has finished that parameter, and sets
``param.grad = None``. Only one parameter's dense gradient is alive at a time, and the optimizer reads the compact
gradient contiguously. Gradient accumulation adds into ``compact_grad`` in the gradient's dtype, as autograd would
into ``.grad``. (A parameter used twice in the forward, a tied embedding and output head, still has its first dense
contribution held by autograd's input buffer until the second arrives: the engine sums them before any hook runs.)

Anything else that reads ``.grad`` must know: :func:`clip_grad_norm_` clips dense and compact gradients together
(``sparsify`` routes the trainer's clipping to it). ``model.zero_grad()`` resets ``.grad`` only and leaves
``compact_grad`` alone; compact gradients are cleared by :class:`~sparse_rl.optim.MaskedAdamW`, whose ``step``
consumes them (so a loop that calls only ``model.zero_grad()``, as ``transformers.Trainer`` does, starts every
accumulation window from zero) and whose ``zero_grad`` drops them, both through :func:`zero_compact_grads`; and by
removing the restriction (the hook's handle deletes the attribute). A loop that runs backward without stepping
MaskedAdamW calls :func:`zero_compact_grads` itself. Single process only: DDP and FSDP all-reduce the dense ``.grad``,
which this frees.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..mask import SubnetworkMask

ATTRIBUTE = "compact_grad"


def compact_grad_of(param: torch.Tensor) -> torch.Tensor | None:
    """The parameter's compact gradient (selected entries in flat order), or None."""
    return getattr(param, ATTRIBUTE, None)


def selected_indices(selection: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Flat indices of the selected entries as int32: 4 bytes per *selected* entry, under the 1 byte per entry of a
    dense bool mask below 25% density, and ``index_select`` gathers them directly where ``masked_select`` would
    scan the whole mask at every backward."""
    if selection.numel() >= 2**31:
        raise ValueError(f"compact gradients need tensors of fewer than 2**31 entries, got {selection.numel()}")
    return selection.reshape(-1).nonzero().squeeze(1).to(device=device, dtype=torch.int32)


def register_compact_gradient(param: torch.nn.Parameter, selection: torch.Tensor | SubnetworkMask, name: str = ""):
    """Install the hook on ``param`` (see module docstring); returns its removable handle. ``selection`` is a bool
    tensor, or a mask with the parameter's ``name``, whose shared int32 positions the hook then holds
    (:meth:`~sparse_rl.mask.SubnetworkMask.selected_indices`, the same tensor a shared reference indexes with)."""
    from_mask = isinstance(selection, SubnetworkMask)
    shape = selection.shape_of(name) if from_mask else tuple(selection.shape)
    if shape != tuple(param.shape):
        raise ValueError(f"selection of shape {shape} does not fit the parameter of shape {tuple(param.shape)}")
    indices = selection.selected_indices(name, param.device) if from_mask else selected_indices(selection, param.device)
    setattr(param, ATTRIBUTE, None)

    def hook(param: torch.Tensor) -> None:
        nonlocal indices
        grad = param.grad
        if grad is None:
            return
        if indices.device != grad.device:  # the model was moved after the hook was installed
            indices = indices.to(grad.device)
        selected = torch.index_select(grad.reshape(-1), 0, indices)
        current = compact_grad_of(param)
        if current is None:
            setattr(param, ATTRIBUTE, selected)
        else:
            current.add_(selected)
        param.grad = None

    handle = param.register_post_accumulate_grad_hook(hook)
    return _Handle(handle, param)


class _Handle:
    """Removes the hook and the parameter's compact gradient."""

    def __init__(self, handle, param: torch.Tensor):
        self._handle, self._param = handle, param

    def remove(self) -> None:
        self._handle.remove()
        if hasattr(self._param, ATTRIBUTE):
            delattr(self._param, ATTRIBUTE)


def zero_compact_grads(params: Iterable[torch.Tensor]) -> None:
    """Drop the compact gradients (``set_to_none`` semantics: the next backward starts from zero)."""
    for param in params:
        if compact_grad_of(param) is not None:
            setattr(param, ATTRIBUTE, None)


def gradients(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Every gradient the parameters hold: dense ``.grad`` and compact ones."""
    grads = []
    for param in params:
        if param.grad is not None:
            grads.append(param.grad)
        compact = compact_grad_of(param)
        if compact is not None:
            grads.append(compact)
    return grads


def clip_grad_norm_(parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over dense and compact gradients together.

    The unselected entries a compact gradient leaves out are zeros of the dense masked gradient, so the total norm is
    the same up to summation order, and scaling the compact entries scales the same values.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = gradients(parameters)
    if not grads:
        return torch.tensor(0.0)
    total_norm = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
    clip_coef = float(max_norm) / (total_norm + 1e-6)
    clip_coef_clamped = torch.clamp(clip_coef, max=1.0)
    for grad in grads:
        grad.mul_(clip_coef_clamped.to(grad.device))
    return total_norm
