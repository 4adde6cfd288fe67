"""Restrict gradients to the subnetwork during backward.

Masking happens in a tensor hook, i.e. while autograd produces each gradient, so everything that reads ``.grad``
afterwards (gradient clipping, ``grad_norm`` logging, DDP all-reduce, gradient accumulation) sees the masked gradient.
A callback before ``optimizer.step()`` would be too late: TRL/transformers clip before the step callbacks run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..mask import SubnetworkMask
from .compact import _Handle, compact_tied_input_embedding, register_compact_gradient
from .compact_head import install_compact_fused_head
from .sharded import is_sharded, restrict_sharded_gradient


@dataclass
class GradientRestriction:
    """Handles of the installed hooks, and which parameters were frozen, so the restriction can be undone."""

    handles: list = field(default_factory=list)
    frozen: list[torch.nn.Parameter] = field(default_factory=list)
    dense_bytes: int = 0  # the bool per entry that dense masking hooks keep

    @property
    def held_bytes(self) -> int:
        """What the hooks keep to mask, now: a bool per entry (dense hooks), and with compact gradients the int32
        positions of each parameter that holds them (off CPU: every one; on CPU only those a compact backward asked
        for, i.e. a tied embedding/output head after its first backward; the others read the mask's bits)."""
        positions = {}
        for handle in self.handles:
            indices = getattr(handle, "_indices", None)
            if isinstance(handle, _Handle) and indices is not None:
                positions[indices.data_ptr()] = indices.numel() * indices.element_size()
        return self.dense_bytes + sum(positions.values())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for param in self.frozen:
            param.requires_grad_(True)
        self.handles.clear()
        self.frozen.clear()
        self.dense_bytes = 0


def restrict_gradients(model: torch.nn.Module, mask: SubnetworkMask, *, compact: bool = False) -> GradientRestriction:
    """Zero gradients outside ``mask`` on every parameter of ``model``.

    Parameters that are not in the mask, or whose selection is empty, get ``requires_grad=False``: no gradient is
    computed or stored for them at all. Fully selected parameters need no hook. With ``compact``, a partly selected
    parameter keeps only its selected gradient entries, in ``param.compact_grad``, and its dense ``.grad`` is freed
    during backward (see :mod:`sparse_rl.restrict.compact`; only :class:`~sparse_rl.optim.MaskedAdamW` reads them).
    """
    named = list(model.named_parameters())
    mask.check_matches(named)
    restriction = GradientRestriction()
    compact_handles = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        count = mask.count(name) if name in mask else 0
        if count == 0:
            param.requires_grad_(False)
            restriction.frozen.append(param)
            continue
        if count == param.numel():
            continue
        if is_sharded(param):  # FSDP2 writes the sharded gradient itself: tensor hooks would not run
            if compact:
                raise ValueError(f"compact gradients are single-process only, but {name!r} is sharded by FSDP2, "
                                 "which reduces the dense gradient")
            restriction.handles.append(restrict_sharded_gradient(param, mask[name]))
            continue
        if compact:
            compact_handles[param] = register_compact_gradient(param, mask, name)
            restriction.handles.append(compact_handles[param])
            continue
        keep = mask[name].to(param.device)
        restriction.handles.append(param.register_hook(_masking_hook(keep)))
        restriction.dense_bytes += keep.numel() * keep.element_size()
    if compact_handles:  # a tied embedding's lookup then never builds a dense gradient of the whole matrix
        compact_tied_input_embedding(model, compact_handles)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and getattr(head, "weight", None) in compact_handles:
            install_compact_fused_head()  # TRL's fused LM head then never builds the head's dense weight gradient
    return restriction


def _masking_hook(keep: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        nonlocal keep
        if keep.device != grad.device:  # the model was moved after the hooks were installed
            keep = keep.to(grad.device)
        return torch.where(keep, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))

    return hook
