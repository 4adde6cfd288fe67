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

**Fused scan** (``optimizer=``): reading the d·N selected entries where they lie in the dense fp32 parameters touches
most of their cache lines at 10% random density, nearly a whole-model read. ``MaskedAdamW`` already reads and writes
each selected entry in its step, so with an optimizer the producer asks it to keep a bf16 copy of them in slot order
(:meth:`sparse_rl.optim.MaskedAdamW.track_rounded`, one 2-byte store per entry in the step), and a patch compares that
compact copy with the last-sent values (:func:`.scan.changed_compact`, 4 bytes per selected entry read). Slot order is
the mask's flat-index order, so a slot is the entry's rank in the selection and the patches are the very ones the
scan builds; no flat indices are kept (a patch that needs them decodes them from the optimizer's selection bitmask).
The optimizer is bound at the first patch (``optimizer`` may be a callable returning it, e.g. the trainer's, created
when training starts) and must step these tensors with this mask, else the producer refuses. Anchors re-read the
parameters and refill the copy, so an anchor repairs anything written outside the optimizer. With
``fused_scan="auto"`` a setup the copy does not support (the Triton kernel on CUDA, fp16 parameters, another server
dtype, an optimizer that is not a ``MaskedAdamW``) falls back to the scan; ``"on"`` refuses it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import torch

from ..mask import SubnetworkMask
from .fingerprint import mask_fingerprint, selected_fingerprint, server_base_fingerprint
from .patch import TensorPatch, WeightPatch, dtype_name, encode_positions
from .scan import changed_bf16, changed_compact, flat_of_ranks, scan_available

FUSED_SCAN = ("auto", "on", "off")

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
        optimizer: the ``MaskedAdamW`` training ``model`` with ``mask`` (or a callable returning it when the first
            patch is built) for the fused scan; None scans the parameters.
        fused_scan: with an optimizer, ``"auto"`` (fused where supported, else the scan), ``"on"`` (refuse setups
            it does not support) or ``"off"``.
    """

    def __init__(self, model: torch.nn.Module, mask: SubnetworkMask, server_dtype: torch.dtype = torch.bfloat16,
                 anchor_every: int = 0, index_encoding: str = "auto", first_sync: str = "anchor",
                 optimizer: object | Callable[[], object] | None = None, fused_scan: str = "auto"):
        if anchor_every < 0:
            raise ValueError(f"anchor_every must be >= 0, got {anchor_every}")
        if first_sync not in ("anchor", "base"):
            raise ValueError(f"first_sync must be 'anchor' or 'base', got {first_sync!r}")
        if index_encoding not in ("auto", "flat_i32"):
            raise ValueError(f"index_encoding must be 'auto' or 'flat_i32', got {index_encoding!r}")
        if fused_scan not in FUSED_SCAN:
            raise ValueError(f"fused_scan must be one of {FUSED_SCAN}, got {fused_scan!r}")
        named = dict(model.named_parameters())
        mask.check_matches(named.items())
        self.mask = mask
        self._optimizer = optimizer if fused_scan != "off" else None
        self.fused_scan = fused_scan
        self.rounded: dict[str, torch.Tensor] | None = None  # the optimizer's copies once bound (fused scan)
        self._layouts: dict[str, object] = {}
        self._bound = None  # the optimizer keeping the rounded copy
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
        self._index_on_device: dict[str, torch.Tensor] = {}
        if self._optimizer is None:
            self._make_indices()
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

    @property
    def fused(self) -> bool:
        """Whether patches come from the optimizer's rounded copy (known once bound, at the first patch)."""
        return self.rounded is not None

    def snapshot_bytes(self) -> int:
        """Bytes of the last-sent values (d·N values in the server dtype)."""
        return sum(v.numel() * v.element_size() for v in (self.last_sent or {}).values())

    def index_bytes(self) -> int:
        """Bytes of the selection's int32 flat indices (derived from the mask, kept to read the selected entries;
        none with the fused scan)."""
        return sum(v.numel() * v.element_size() for v in self.selected_flat.values())

    def rounded_bytes(self) -> int:
        """Bytes of the optimizer's rounded copy that the fused scan reads (d·N values in bf16; 0 without it)."""
        return sum(v.numel() * v.element_size() for v in (self.rounded or {}).values())

    def close(self) -> None:
        """Stop the optimizer's rounded copy (its steps go back to what they were without a sync); later patches
        scan the parameters."""
        if self._bound is not None:
            self._bound.untrack_rounded(self.params)
            self._bound, self.rounded, self._optimizer = None, None, None
            self._make_indices()

    # ------------------------------------------------------------------ fused scan
    def _make_indices(self) -> None:
        for name in self.params:
            if name not in self.selected_flat:
                self.selected_flat[name] = self.mask.flat_indices(name).to(torch.int32)
                self._index_on_device[name] = self.selected_flat[name].to(self.params[name].device)

    def _bind(self) -> None:
        """Bind the optimizer (first patch): check it trains these tensors with this mask, then ask it for the rounded
        copy, or fall back to the scan (``fused_scan="auto"``) where it cannot keep one."""
        from ..optim import MaskedAdamW, unwrap_optimizer

        source = self._optimizer
        optimizer = unwrap_optimizer(source() if callable(source) else source)
        if optimizer is None:  # not created yet (a sync before training): scan for now, bind at a later patch
            self._make_indices()
            return
        self._optimizer = None
        reason = None
        if not isinstance(optimizer, MaskedAdamW):
            reason = f"the optimizer is {type(optimizer).__name__}, not a MaskedAdamW"
        else:
            self._check_same_mask(optimizer)
            if self.dtype != torch.bfloat16:
                reason = f"the server dtype is {self.dtype_name} (the rounded copy is bf16)"
        if reason is None:
            try:
                self.rounded = optimizer.track_rounded(self.params)
            except (TypeError, RuntimeError) as error:
                reason = str(error)
        if reason is not None:
            if self.fused_scan == "on":
                raise RuntimeError(f"fused_scan='on' but the optimizer cannot keep the rounded copy: {reason}")
            self._make_indices()
            return
        self._layouts = {name: optimizer.selection_layout(name) for name in self.params}
        self._bound = optimizer
        self.selected_flat.clear()  # made by patches built before the optimizer existed
        self._index_on_device.clear()

    def _check_same_mask(self, optimizer) -> None:
        ours = self.mask.digests()
        for name, digest in optimizer.mask_digests().items():
            theirs_selects = int(optimizer.selection_layout(name).num_selected) > 0
            if ours.get(name) != digest and (theirs_selects or name in self.params):
                raise ValueError(f"the weight sync's mask and the optimizer's mask differ on {name!r}: the fused scan "
                                 "reads the optimizer's compact slots, which would belong to other entries (and a sync "
                                 "with another mask would miss trained entries). Attach the sync with the mask the "
                                 "optimizer trains (what sparsify returned)")

    def _flat_of(self, name: str) -> Callable[[torch.Tensor], torch.Tensor] | torch.Tensor:
        if name in self.selected_flat:
            return self.selected_flat[name]
        layout = self._layouts[name]
        return lambda ranks: flat_of_ranks(layout.mask_words.cpu(), layout.tile_offsets.cpu(), ranks)

    # ------------------------------------------------------------------ patches
    @torch.no_grad()
    def build(self, anchor: bool | None = None) -> WeightPatch:
        """The next patch: an anchor when one is due (or ``anchor=True``), else the selected entries whose
        server-dtype bits changed since the previous patch. Records its values as sent."""
        if self._optimizer is not None:
            self._bind()
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
                if self.rounded is not None:  # re-read: repairs anything written outside the optimizer
                    self.rounded[name].copy_(current)
                self.last_sent[name] = current
                patch.tensors.append(TensorPatch(name, "all", b"", current.cpu()))
                continue
            changed, values = self._changed(name)
            if not changed.numel():
                continue
            encoding, positions = encode_positions(changed, self.last_sent[name].numel(), self._flat_of(name),
                                                   self.index_encoding)
            patch.tensors.append(TensorPatch(name, encoding, positions, values.cpu()))
        self._anchor_requested = False
        return patch

    def _changed(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Ranks (CPU int64) and new values of the selected entries of ``name`` whose server-dtype bits changed since
        the last patch; records them as sent."""
        param, last = self.params[name], self.last_sent[name]
        if self.rounded is not None:  # the optimizer's copy, compact (sparse_rl.sync.scan)
            return changed_compact(self.rounded[name], last)
        if scan_available(param, self.dtype):  # one pass over the d·N entries (sparse_rl.sync.scan)
            return changed_bf16(param, self.selected_flat[name], last)
        current = self._current(name)
        int_type = _INT_VIEW[current.element_size()]
        changed = (current.view(int_type) != last.view(int_type)).nonzero().squeeze(1)
        values = current.index_select(0, changed)
        last.index_copy_(0, changed, values)
        return changed.cpu(), values

    def _current(self, name: str) -> torch.Tensor:
        """The selected entries of ``name`` now, cast to the server dtype (one gather of d·N entries)."""
        flat = self.params[name].detach().reshape(-1)
        if name not in self._index_on_device:  # fused scan: no indices kept, select with the mask itself
            return flat[self.mask[name].reshape(-1).to(flat.device)].to(self.dtype)
        return flat.index_select(0, self._index_on_device[name]).to(self.dtype)
