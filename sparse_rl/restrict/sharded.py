"""Sparse training on sharded (DTensor) parameters, as FSDP2's ``fully_shard`` makes them.

``fully_shard`` replaces every parameter by a new ``nn.Parameter`` holding a ``DTensor`` (``Shard(0)`` on a 1-D
mesh: rank ``r`` keeps the ``r``-th ``torch.chunk`` of the rows, so shards can be uneven or empty). Each rank then
works on its shard only:

- the mask of a parameter is cut exactly like the parameter, with DTensor's own sharding (:func:`local_selection`);
- :class:`~sparse_rl.optim.MaskedAdamW` steps ``param.to_local()`` with that local mask and keeps compact state for
  the local selected entries only (each rank saves its own state);
- gradients are masked on the sharded gradient. FSDP2 does not run tensor hooks of the sharded parameter (its
  gradient is written by the reduce-scatter, not by autograd), and hooks put on the parameters before
  ``fully_shard`` stay on the replaced originals. It does run the parameter's *post-accumulate-grad* hooks right after
  writing the reduce-scattered gradient, before ``backward()`` returns, so clipping and ``grad_norm`` still see the
  masked gradient. Masking after the reduce-scatter equals masking before it: the sum over ranks is elementwise.

The mask itself must be the same on every rank (build it from the same seed, or broadcast it). In a loop of one's own::

    mask = random_mask(model, 0.1, seed=0)       # on the unsharded model, same on every rank
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    restrict_gradients(model, mask)              # after fully_shard: it replaces the parameters
    optimizer = MaskedAdamW(model.named_parameters(), mask, lr=1e-5)

With ``transformers.Trainer`` (``fsdp_config={"version": 2}``), ``sparsify`` does the same after accelerate's
``prepare`` (see ``sparse_rl.trl``).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from ..mask import SubnetworkMask


def is_sharded(param: torch.Tensor) -> bool:
    """True for a DTensor parameter (FSDP2, tensor parallel): the optimizer and the hooks work on its local shard."""
    return isinstance(param, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (no copy, shares storage), or the tensor itself."""
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def local_selection(param: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
    """The part of ``selection`` (full-size bool mask of ``param``) that lines up with this rank's shard of ``param``.

    DTensor cuts the mask itself, with the parameter's mesh and placements, so uneven and empty shards come out as
    they do for the parameter. ``src_data_rank=None`` chunks the local copy without communication: every rank must
    hold the same mask.
    """
    if tuple(selection.shape) != tuple(param.shape):
        raise ValueError(f"mask has shape {tuple(selection.shape)} but the parameter has shape {tuple(param.shape)}")
    if not isinstance(param, DTensor):
        return selection
    local = distribute_tensor(selection.to(param.device_mesh.device_type), param.device_mesh, param.placements,
                              src_data_rank=None).to_local()
    if tuple(local.shape) != tuple(param._local_tensor.shape):  # e.g. a placement DTensor pads differently
        raise RuntimeError(f"the mask's local shard has shape {tuple(local.shape)} but the parameter's has "
                           f"{tuple(param._local_tensor.shape)} (placements {param.placements})")
    return local.contiguous()


def shard_mask(model: torch.nn.Module, mask: SubnetworkMask) -> dict[str, torch.Tensor]:
    """Local selection of every masked parameter of a (possibly) sharded ``model``, keyed like ``mask``."""
    params = dict(model.named_parameters())
    mask.check_matches(params.items())
    return {name: local_selection(params[name], selection) for name, selection in mask.items()}


def restrict_sharded_gradient(param: torch.Tensor, selection: torch.Tensor):
    """Zero the local gradient of DTensor ``param`` outside ``selection`` each time FSDP2 (or autograd) writes it;
    returns the hook handle."""
    if not isinstance(param, DTensor):
        raise TypeError(f"expected a DTensor parameter, got {type(param).__name__}; use restrict_gradients")
    drop = ~local_selection(param, selection).to(param._local_tensor.device)

    def hook(sharded: torch.Tensor) -> None:
        with torch.no_grad():
            local_tensor(sharded.grad).masked_fill_(drop, 0)

    return param.register_post_accumulate_grad_hook(hook)


def restrict_sharded_gradients(named_params, mask: SubnetworkMask) -> list:
    """Masking hooks (see :func:`restrict_sharded_gradient`) on the DTensor parameters among ``named_params`` whose
    selection is partial; returns the handles.

    For a model that was sharded *after* :func:`~sparse_rl.restrict.gradients.restrict_gradients` ran:
    ``fully_shard`` (e.g. in accelerate's FSDP2 ``prepare``) replaces the parameters, and the hooks stay on the
    originals. Pass the optimizer's ``(param_names, params)`` pairs: they carry the mask's names even when the module
    names changed (activation checkpointing wrappers) and, after accelerate swapped them, the sharded parameters.
    """
    handles = []
    for name, param in named_params:
        if is_sharded(param) and param.requires_grad and not bool(mask[name].all()):
            handles.append(restrict_sharded_gradient(param, mask[name]))
    return handles
