"""``PatchReceiver``: applies weight patches in place to a model held in the server dtype.

A patch is checked whole before any weight is written, so a refused patch (:class:`PatchRefused`) leaves the model as
it was:

- its mask fingerprint and base fingerprint equal the receiver's (the receiver computes the base fingerprint from the
  model it holds, so a server that loaded another checkpoint, or another dtype, refuses every patch);
- its dtype is the receiver's;
- order: the receiver starts with no stream and takes only an anchor, or a stream's patch 0 relative to the base
  (``base_start``) when its own selected entries still equal that base (it has applied nothing since it loaded); an
  anchor of any stream (a new or resumed
  sender) is taken unless it is an old one of the current stream; a non-anchor patch must be the next sequence number of
  the current stream (a duplicate, a gap or another stream's patch is refused, and the sender answers with an anchor);
- every tensor is a parameter of the mask, with positions inside its selection, strictly increasing, and as many
  values as positions.

Application is one flattened ``index_copy_`` per tensor into the parameter's storage (no full-tensor copy). The
positions are turned into flat indices through the selection's sorted flat indices, which the receiver keeps (int64,
8 bytes per selected entry; the mask's bool tensors are dropped after construction).

:meth:`PatchReceiver.apply_to` splits validation from writing so that other targets (vLLM's fused parameters, see
:mod:`sparse_rl.sync.vllm`) reuse the same checks with their own writer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..mask import SubnetworkMask
from .fingerprint import mask_fingerprint, selected_fingerprint, server_base_fingerprint
from .patch import PatchRefused, WeightPatch, decode_patch, decode_ranks, dtype_name


class AnchorNeeded(PatchRefused):
    """The patch was refused because the receiver needs an anchor first (fresh receiver, gap, other stream)."""


@dataclass
class CheckedTensor:
    """A validated tensor patch: flat int64 indices into the Hugging Face parameter and its new values."""

    name: str
    flat_indices: torch.Tensor
    values: torch.Tensor


class PatchReceiver:
    """Holds the receiving end's sync state for a model whose parameters are in the server dtype.

    Args:
        model: the model the server generates with (Hugging Face names), in the server dtype. May be ``None`` when
            the caller writes elsewhere through :meth:`apply_to` (then pass ``base_fingerprint`` and ``shapes``).
        mask: the training mask (the same file the trainer uses).
        base_fingerprint: the base fingerprint of what the receiver holds; computed from ``model`` when omitted.
    """

    def __init__(self, model: torch.nn.Module | None, mask: SubnetworkMask, base_fingerprint: str | None = None,
                 dtype: torch.dtype | None = None, start_fingerprint: str | None = None):
        self.model = model
        self.params = dict(model.named_parameters()) if model is not None else {}
        if model is not None:
            mask.check_matches(self.params.items())
            dtypes = {p.dtype for name, p in self.params.items() if name in mask}
            if len(dtypes) != 1:
                raise ValueError("the receiver's masked parameters must share one dtype, got "
                                 f"{sorted(map(str, dtypes))}")
            dtype = dtypes.pop()
            for name in mask:
                if not self.params[name].is_contiguous():
                    raise ValueError(f"{name} is not contiguous; the receiver writes through flat views")
        if dtype is None:
            raise ValueError("pass dtype= when the receiver holds no model")
        self.dtype = dtype
        self.dtype_name = dtype_name(dtype)
        self.selections = {name: sel.reshape(-1) for name, sel in mask.items() if bool(sel.any())}
        self.selected_flat = {name: sel.nonzero().squeeze(1) for name, sel in self.selections.items()}
        self.mask_fingerprint = mask_fingerprint(mask)
        if base_fingerprint is None:
            if model is None:
                raise ValueError("pass base_fingerprint= when the receiver holds no model")
            base_fingerprint = server_base_fingerprint(self.params.items(), mask, dtype)
        self.base_fingerprint = base_fingerprint
        if start_fingerprint is None and model is not None:
            start_fingerprint = selected_fingerprint(self.params.items(), mask, dtype)
        self.start_fingerprint = start_fingerprint  # what its selected entries held when it loaded
        self.stream: str | None = None
        self.sequence: int | None = None
        self.applied = 0

    # ------------------------------------------------------------------ checks
    def check(self, patch: WeightPatch | bytes | bytearray | memoryview) -> tuple[WeightPatch, list[CheckedTensor]]:
        """Decode (when given bytes) and validate ``patch`` against this receiver's state; nothing is written."""
        if not isinstance(patch, WeightPatch):
            patch = decode_patch(patch)
        if patch.mask_fingerprint != self.mask_fingerprint:
            raise PatchRefused(f"patch {patch.sequence} was built for another mask (fingerprint "
                               f"{patch.mask_fingerprint[:12]}..., here {self.mask_fingerprint[:12]}...); "
                               "load the trainer's mask file on the server")
        if patch.base_fingerprint != self.base_fingerprint:
            raise PatchRefused(f"patch {patch.sequence} was built for another base (fingerprint "
                               f"{patch.base_fingerprint[:12]}..., here {self.base_fingerprint[:12]}...): "
                               "the server's unselected weights differ from the trainer's; load the same checkpoint "
                               f"in {self.dtype_name}")
        if patch.dtype != self.dtype_name:
            raise PatchRefused(f"patch {patch.sequence} holds {patch.dtype} values, the server's weights are "
                               f"{self.dtype_name}")
        self._check_order(patch)
        checked = []
        seen = set()
        for tensor in patch.tensors:
            if tensor.name not in self.selections:
                raise PatchRefused(f"patch {patch.sequence} names {tensor.name!r}, which the mask does not train")
            if tensor.name in seen:
                raise PatchRefused(f"patch {patch.sequence} holds {tensor.name!r} twice")
            seen.add(tensor.name)
            selected_flat = self.selected_flat[tensor.name]
            ranks = decode_ranks(tensor.encoding, tensor.positions, tensor.count, selected_flat.numel(),
                                 self.selections[tensor.name], selected_flat, tensor.name)
            checked.append(CheckedTensor(tensor.name, selected_flat.index_select(0, ranks), tensor.values))
        if patch.anchor and seen != set(self.selections):
            missing = sorted(set(self.selections) - seen)
            raise PatchRefused(f"anchor {patch.sequence} lacks {len(missing)} trained tensor(s), e.g. {missing[0]!r}")
        return patch, checked

    def _check_order(self, patch: WeightPatch) -> None:
        same_stream = patch.stream == self.stream
        if patch.anchor:
            if same_stream and patch.sequence <= self.sequence:
                raise PatchRefused(f"anchor {patch.sequence} is a duplicate or arrived out of order (last applied: "
                                   f"{self.sequence})")
            return
        if patch.base_start:
            if self.stream is not None or patch.sequence != 0:
                raise AnchorNeeded(f"patch {patch.sequence} is relative to the base, but this receiver has applied "
                                   "patches since it loaded")
            if patch.base_start != self.start_fingerprint:
                raise AnchorNeeded(f"patch {patch.sequence} is relative to a base whose selected entries differ from "
                                   "what this receiver loaded")
            return
        if self.stream is None:
            raise AnchorNeeded(f"patch {patch.sequence} is not an anchor, and this receiver has not taken one yet")
        if not same_stream:
            raise AnchorNeeded(f"patch {patch.sequence} comes from another sender stream ({patch.stream[:8]}, this "
                               f"receiver follows {self.stream[:8]}): a restarted or resumed trainer starts with an "
                               "anchor")
        if patch.sequence <= self.sequence:
            raise PatchRefused(f"patch {patch.sequence} is a duplicate or arrived out of order (last applied: "
                               f"{self.sequence})")
        if patch.sequence != self.sequence + 1:
            raise AnchorNeeded(f"patch {patch.sequence} skips patch(es) {self.sequence + 1}..{patch.sequence - 1}")

    # ------------------------------------------------------------------ application
    def apply(self, patch: WeightPatch | bytes | bytearray | memoryview) -> WeightPatch:
        """Validate ``patch`` whole, then write it into the model in place; returns the decoded patch."""
        return self.apply_to(patch, self._write_hf)

    def apply_to(self, patch, write: Callable[[list[CheckedTensor]], None]) -> WeightPatch:
        """Validate ``patch`` whole, then hand its checked tensors to ``write``, then advance the sequence."""
        patch, checked = self.check(patch)
        write(checked)
        self.stream, self.sequence = patch.stream, patch.sequence
        self.applied += 1
        return patch

    @torch.no_grad()
    def _write_hf(self, checked: list[CheckedTensor]) -> None:
        for tensor in checked:
            flat = self.params[tensor.name].data.view(-1)
            flat.index_copy_(0, tensor.flat_indices.to(flat.device), tensor.values.to(flat.device))
