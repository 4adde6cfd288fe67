"""``PatchProducer``: the trainer side of the sparse weight sync.

After an optimizer step only the mask's selected entries can have moved, so the producer reads those d·N entries of
each trained parameter (one ``index_select`` with the selection's flat indices), casts them to the server dtype and
compares their bits with the values it last sent. It keeps nothing else: the last-sent values of the selected entries
(``d·N`` values in the server dtype) and the selection's int32 flat indices. It never scans the unselected entries
and keeps no model copy; a whole-model diff (verl's ``delta_sharded``, PULSE) must cast and compare all N entries
against an N-entry snapshot.

The first patch of a producer is an **anchor**: every selected entry, with no positions (the receiver knows the mask).
With ``first_sync="base"`` it is instead the selected entries that differ from the values the model had when the
producer was built (the base, if it is built before training): what a whole-model diff sends first, and much smaller
than an anchor at small learning rates. A receiver takes it only if it has applied nothing since loading that base
(its selected entries' fingerprint must equal the producer's); otherwise it asks for an anchor.

The first patch after :meth:`PatchProducer.request_anchor` (a receiver that restarted, or a refusal) is an anchor,
and so is every ``anchor_every``-th patch. A resumed trainer builds a new producer, with a new stream id, whose first
patch is an anchor again (or relative to the base, which a receiver following the old stream refuses, so the
sender then sends an anchor). Between anchors a patch holds the entries whose server-dtype bits changed; bits are
compared as integers, so a NaN payload or a sign change of zero counts as a change.

Sequence numbers count every patch of the stream from 0, empty ones included, so a receiver can tell a missing patch
from a quiet step.
"""

from __future__ import annotations

import uuid

import torch

from ..mask import SubnetworkMask
from .fingerprint import mask_fingerprint, selected_fingerprint, server_base_fingerprint
from .patch import TensorPatch, WeightPatch, dtype_name, encode_positions
from .scan import changed_bf16, fused_scan_available

_INT_VIEW = {2: torch.int16, 4: torch.int32}


class PatchProducer:
    """Builds :class:`~sparse_rl.sync.patch.WeightPatch` es of ``model``'s selected entries (see the module docstring).

    Args:
        model: the trained model (parameters under their Hugging Face names).
        mask: the training mask.
        server_dtype: dtype of the generation server's weights.
        anchor_every: every this many patches is an anchor (0: only the first and requested ones).
        index_encoding: ``"auto"`` picks the smallest position encoding per tensor; ``"flat_i32"`` always writes int32
            flat indices.
        first_sync: ``"anchor"`` or ``"base"`` (see the module docstring).
    """

    def __init__(self, model: torch.nn.Module, mask: SubnetworkMask, server_dtype: torch.dtype = torch.bfloat16,
                 anchor_every: int = 0, index_encoding: str = "auto", first_sync: str = "anchor"):
        if anchor_every < 0:
            raise ValueError(f"anchor_every must be >= 0, got {anchor_every}")
        if first_sync not in ("anchor", "base"):
            raise ValueError(f"first_sync must be 'anchor' or 'base', got {first_sync!r}")
        if index_encoding not in ("auto", "flat_i32"):
            raise ValueError(f"index_encoding must be 'auto' or 'flat_i32', got {index_encoding!r}")
        named = dict(model.named_parameters())
        mask.check_matches(named.items())
        self.dtype = server_dtype
        self.dtype_name = dtype_name(server_dtype)
        self.anchor_every = anchor_every
        self.index_encoding = index_encoding
        self.params: dict[str, torch.Tensor] = {}
        self.selected_flat: dict[str, torch.Tensor] = {}
        for name, selection in mask.items():
            if not bool(selection.any()):
                continue
            param = named[name]
            if type(param.data) is not torch.Tensor and not isinstance(param.data, torch.nn.Parameter):
                raise TypeError(f"{name} is a {type(param.data).__name__}: sharded parameters (FSDP2 DTensor) are "
                                "not supported by the weight sync; gather them first")
            self.params[name] = param
            self.selected_flat[name] = mask.flat_indices(name).to(torch.int32)
        self._index_on_device = {name: idx.to(self.params[name].device) for name, idx in self.selected_flat.items()}
        self.mask_fingerprint = mask_fingerprint(mask)
        self.base_fingerprint = server_base_fingerprint(named.items(), mask, server_dtype)
        self.stream = uuid.uuid4().hex
        self.sequence = -1
        self.last_sent: dict[str, torch.Tensor] | None = None
        self._anchor_requested = True
        self.base_start = ""
        if first_sync == "base":
            self.base_start = selected_fingerprint(named.items(), mask, server_dtype)
            self.last_sent = {name: self._current(name) for name in self.params}
            self._anchor_requested = False

    # ------------------------------------------------------------------ state
    def request_anchor(self) -> None:
        """Make the next patch an anchor (a receiver restarted or refused a patch)."""
        self._anchor_requested = True

    @property
    def next_is_anchor(self) -> bool:
        return (self._anchor_requested or self.last_sent is None
                or (self.anchor_every > 0 and self.sequence >= 0 and (self.sequence + 1) % self.anchor_every == 0))

    def snapshot_bytes(self) -> int:
        """Bytes of the last-sent values (d·N values in the server dtype)."""
        return sum(v.numel() * v.element_size() for v in (self.last_sent or {}).values())

    def index_bytes(self) -> int:
        """Bytes of the selection's int32 flat indices (derived from the mask, kept to read the selected entries)."""
        return sum(v.numel() * v.element_size() for v in self.selected_flat.values())

    # ------------------------------------------------------------------ patches
    @torch.no_grad()
    def build(self, anchor: bool | None = None) -> WeightPatch:
        """The next patch: an anchor when one is due (or ``anchor=True``), else the selected entries whose
        server-dtype bits changed since the previous patch. Records its values as sent."""
        anchor = self.next_is_anchor if anchor is None else (anchor or self.next_is_anchor)
        self.sequence += 1
        if anchor:
            self.last_sent = {}
        patch = WeightPatch(stream=self.stream, sequence=self.sequence, anchor=anchor,
                            mask_fingerprint=self.mask_fingerprint, base_fingerprint=self.base_fingerprint,
                            dtype=self.dtype_name,
                            base_start=self.base_start if self.sequence == 0 and not anchor else "")
        for name in self.params:
            if anchor:
                current = self._current(name)
                self.last_sent[name] = current
                patch.tensors.append(TensorPatch(name, "all", b"", current.cpu()))
                continue
            changed, values = self._changed(name)
            if not changed.numel():
                continue
            selected_flat = self.selected_flat[name]
            encoding, positions = encode_positions(changed, selected_flat.numel(), selected_flat, self.index_encoding)
            patch.tensors.append(TensorPatch(name, encoding, positions, values.cpu()))
        self._anchor_requested = False
        return patch

    def _changed(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Ranks (CPU int64) and new values of the selected entries of ``name`` whose server-dtype bits changed since
        the last patch; records them as sent."""
        param, last = self.params[name], self.last_sent[name]
        if fused_scan_available(param, self.dtype):  # one pass over the d·N entries (sparse_rl.sync.scan)
            return changed_bf16(param, self.selected_flat[name], last)
        current = self._current(name)
        int_type = _INT_VIEW[current.element_size()]
        changed = (current.view(int_type) != last.view(int_type)).nonzero().squeeze(1)
        values = current.index_select(0, changed)
        last.index_copy_(0, changed, values)
        return changed.cpu(), values

    def _current(self, name: str) -> torch.Tensor:
        """The selected entries of ``name`` now, cast to the server dtype (one gather of d·N entries)."""
        return self.params[name].detach().reshape(-1).index_select(0, self._index_on_device[name]).to(self.dtype)
