"""What sender and receiver must agree on before a patch may be applied: the mask, and the base in the server dtype.

- :func:`mask_fingerprint`: SHA-256 over the per-tensor digests of :meth:`sparse_rl.mask.SubnetworkMask.digests` (name,
  shape, packed selection bits), sorted by name.
- :func:`server_base_fingerprint`: SHA-256 over every parameter's name, shape and the bits of its *unselected* entries
  after the cast to the server dtype (selected entries zeroed), the same construction as
  :func:`sparse_rl.delta.base_checksum` but in the dtype the server holds. A patch only ever writes selected entries, so
  the receiver holds the trainer's weights (rounded) exactly when its base fingerprint equals the sender's and it has
  taken an anchor and every patch since. The trainer computes it from its fp32 weights at any step (unselected entries
  never move); the receiver from the bf16 model it loaded.
- :func:`selected_fingerprint`: SHA-256 over the *selected* entries in the server dtype. A stream may start with a patch
  relative to the base instead of an anchor (``first_sync="base"``); the receiver takes it only if its own selected
  entries still have this fingerprint, i.e. it holds the whole base.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

from ..mask import SubnetworkMask

_CHUNK = 1 << 22
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def mask_fingerprint(mask: SubnetworkMask) -> str:
    digest = hashlib.sha256()
    for name, tensor_digest in sorted(mask.digests().items()):
        digest.update(f"{name}={tensor_digest}\n".encode())
    return digest.hexdigest()


def server_base_fingerprint(named_parameters: Iterable[tuple[str, torch.Tensor]], mask: SubnetworkMask,
                            dtype: torch.dtype) -> str:
    """SHA-256 of the unselected entries of the parameters cast to ``dtype`` (see the module docstring)."""
    digest = hashlib.sha256()
    for name, param in sorted(named_parameters, key=lambda item: item[0]):
        digest.update(f"{name}|{tuple(param.shape)}\n".encode())
        flat = param.detach().reshape(-1)
        selection = mask.selections.get(name)
        selected = None if selection is None else selection.reshape(-1)
        int_type = _INT_OF_SIZE[torch.empty((), dtype=dtype).element_size()]
        for start in range(0, flat.numel(), _CHUNK):
            bits = flat[start : start + _CHUNK].to(dtype).view(int_type)
            if selected is not None:
                bits = bits.masked_fill(selected[start : start + _CHUNK].to(bits.device), 0)
            digest.update(bits.cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def selected_fingerprint(named_parameters: Iterable[tuple[str, torch.Tensor]], mask: SubnetworkMask,
                         dtype: torch.dtype) -> str:
    """SHA-256 of the selected entries of the parameters cast to ``dtype``, in flat-index order, sorted by name."""
    digest = hashlib.sha256()
    int_type = _INT_OF_SIZE[torch.empty((), dtype=dtype).element_size()]
    for name, param in sorted(named_parameters, key=lambda item: item[0]):
        selection = mask.selections.get(name)
        if selection is None or not bool(selection.any()):
            continue
        digest.update(f"{name}|{tuple(param.shape)}\n".encode())
        index = selection.reshape(-1).nonzero().squeeze(1).to(param.device)
        values = param.detach().reshape(-1).index_select(0, index).to(dtype).view(int_type)
        digest.update(values.cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()
