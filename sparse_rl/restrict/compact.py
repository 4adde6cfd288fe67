"""Compact gradients: keep only the subnetwork's gradient entries, and free the dense gradient during backward.

With a 10% mask, 90% of a dense ``.grad`` is zeros that :class:`~sparse_rl.optim.MaskedAdamW` never reads, yet they
cost 4 bytes per parameter (as much as the fp32 weights) and a read of the whole tensor at every step. Here a
post-accumulate-grad hook copies the selected entries of each gradient, in flat order (the slot order of the
optimizer's compact state), into ``param.compact_grad`` as soon as autograd has finished that parameter, and sets
``param.grad = None``. Only one parameter's dense gradient is alive at a time, and the optimizer reads the compact
gradient contiguously. Gradient accumulation adds into ``compact_grad`` in the gradient's dtype, as autograd would
into ``.grad``. Compact backwards (a tied embedding's lookup, TRL's fused LM head: :mod:`.compact_head`) build no dense
gradient at all: they hand their selected entries to the handle (:meth:`_Handle.deliver`), which adds them to the
dense gradient's selected entries if one reaches the parameter, else at the end of the backward pass.

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
from . import bitscan

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
    tensor, or a mask with the parameter's ``name``. From a mask, a CPU parameter's hook gathers its entries straight
    from the mask's packed bits (:mod:`.bitscan`: no positions held); elsewhere (or without numba) it holds the
    mask's shared int32 positions (:meth:`~sparse_rl.mask.SubnetworkMask.selected_indices`, the same tensor a
    shared reference indexes with)."""
    from_mask = isinstance(selection, SubnetworkMask)
    shape = selection.shape_of(name) if from_mask else tuple(selection.shape)
    if shape != tuple(param.shape):
        raise ValueError(f"selection of shape {shape} does not fit the parameter of shape {tuple(param.shape)}")
    packed = None
    if from_mask and bitscan.walks(param):
        packed, count, indices = selection.packed_bits(name), selection.count(name), None
    else:
        indices = (selection.selected_indices(name, param.device) if from_mask
                   else selected_indices(selection, param.device))
        count = indices.numel()
    setattr(param, ATTRIBUTE, None)
    pending: list[tuple[torch.Tensor | None, torch.Tensor]] = []  # (slots, values) from compact backwards

    def hook(param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        flat = grad.reshape(-1)
        if packed is not None and flat.device.type == "cpu" and flat.is_contiguous():
            selected = bitscan.gather_selected(flat, packed, count)
        else:
            selected = torch.index_select(flat, 0, handle_.positions(flat.device))
        _collect(param, selected, pending)
        param.grad = None

    handle = param.register_post_accumulate_grad_hook(hook)
    positions = (lambda device: selection.selected_indices(name, device)) if from_mask else None
    handle_ = _Handle(handle, param, indices, count, pending, positions)
    return handle_


def _collect(param: torch.Tensor, selected: torch.Tensor | None, pending: list) -> None:
    """Add the pending contributions (compact backwards that built no dense gradient, in the order autograd produced
    them; ``slots`` None means every slot) to ``selected`` (the dense gradient's selected entries, or None when no
    dense gradient reached the parameter), and that into the parameter's compact gradient."""
    for slots, values in pending:
        if selected is None:
            selected = values.clone() if slots is None else None
            if selected is not None:
                continue
            selected = torch.zeros(compact_size(param), dtype=values.dtype, device=values.device)
        if slots is None:
            selected.add_(values)
        else:
            selected.index_add_(0, slots, values)
    pending.clear()
    if selected is None:
        return
    current = compact_grad_of(param)
    if current is None:
        setattr(param, ATTRIBUTE, selected)
    else:
        current.add_(selected)


def compact_size(param: torch.Tensor) -> int:
    return handle_of(param).count


def handle_of(param: torch.Tensor) -> _Handle | None:
    """The compact-gradient handle installed on ``param``, or None."""
    return getattr(param, _HANDLE_ATTRIBUTE, None)


_HANDLE_ATTRIBUTE = "_sparse_rl_compact_handle"


class _Handle:
    """Removes the hook and the parameter's compact gradient; knows the selected positions when asked."""

    def __init__(self, handle, param: torch.Tensor, indices: torch.Tensor | None, count: int, pending: list,
                 positions=None):
        self._handle, self._param = handle, param
        self._indices, self.count, self.pending = indices, count, pending
        self._positions = positions  # device -> the mask's shared int32 positions (None: built from a bool tensor)
        self._undo: list = []
        self._flush_queued = False
        setattr(param, _HANDLE_ATTRIBUTE, self)

    @property
    def indices(self) -> torch.Tensor:
        """Flat int32 positions of the selected entries (sorted), on the parameter's device. A hook that gathers from
        packed bits builds them on first use and keeps them: only compact backwards (tied embedding, output head)
        ask, so only their parameter pays 4 bytes per selected entry."""
        return self.positions(self._param.device)

    def positions(self, device: torch.device) -> torch.Tensor:
        if self._indices is None or self._indices.device != device:
            if self._positions is None:
                self._indices = self._indices.to(device)
            else:
                self._indices = self._positions(device)
        return self._indices

    def deliver(self, slots: torch.Tensor | None, values: torch.Tensor) -> None:
        """From a compact backward: queue ``values`` for the slots ``slots`` (None: all), added to the compact
        gradient when autograd hands the parameter its dense gradient, or at the end of the backward pass if none
        comes (the backward then returns no gradient for the weight: not even a zero, which autograd's gradient
        accumulator would copy into a dense tensor)."""
        self.pending.append((slots, values))
        if not self._flush_queued:
            self._flush_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._flush)

    def _flush(self) -> None:
        self._flush_queued = False
        if self.pending:
            _collect(self._param, None, self.pending)

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self._handle.remove()
        if getattr(self._param, _HANDLE_ATTRIBUTE, None) is self:
            delattr(self._param, _HANDLE_ATTRIBUTE)
        if hasattr(self._param, ATTRIBUTE):
            delattr(self._param, ATTRIBUTE)


# ---------------------------------------------------------------------------------------------- tied embedding
def compact_tied_input_embedding(model: torch.nn.Module, handles: dict[torch.nn.Parameter, _Handle]) -> bool:
    """Give a tied input embedding (the same matrix as the output head) a compact backward, so its dense gradient
    is never built; True if installed. The undo is kept by the weight's compact-gradient handle.

    The weight of a tied embedding gets two dense gradients, the output head's and the lookup's, which autograd sums
    before any hook runs: both are alive at the end of backward (2 x 108 MiB for SmolLM2-135M in fp32). The lookup's
    gradient is only a handful of rows (one per distinct token), so the embedding's forward is rerouted through
    :class:`_CompactEmbeddingBackward`: it sums the rows exactly as torch's dense CPU backward does (zero-started, in
    token order) and hands the handle the selected entries of those rows (:meth:`_Handle.deliver`), which adds them
    after the head's (dense, or compact from :mod:`.compact_head`); autograd gets no gradient for the weight from the
    lookup (a zero would be copied into a dense tensor by its gradient accumulator). Installed on CPU weights only,
    where the row sums are checked bit for bit against torch's kernel; only for a plain ``nn.Embedding`` (no
    ``max_norm``, ``scale_grad_by_freq`` or sparse gradients, no subclass forward such as a scaled embedding). Exact
    as long as the head's gradient reaches the weight before the lookup's, as in one forward per backward.
    """
    get_input, get_output = (getattr(model, name, None) for name in ("get_input_embeddings", "get_output_embeddings"))
    if get_input is None or get_output is None:
        return False
    embedding, head = get_input(), get_output()
    if not isinstance(embedding, torch.nn.Embedding) or type(embedding).forward is not torch.nn.Embedding.forward:
        return False
    weight = embedding.weight
    if head is None or getattr(head, "weight", None) is not weight or weight not in handles:
        return False
    if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
        return False
    if weight.device.type != "cpu":
        return False
    handle = handles[weight]
    had_own = "forward" in embedding.__dict__
    original = embedding.forward

    def forward(input: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and embedding.weight.requires_grad) or embedding.weight.device.type != "cpu":
            return original(input)
        return _CompactEmbeddingBackward.apply(input, embedding.weight, embedding.padding_idx, handle)

    def undo() -> None:
        if had_own:
            embedding.forward = original
        else:
            del embedding.forward

    embedding.forward = forward
    handle._undo.append(undo)
    return True


class _CompactEmbeddingBackward(torch.autograd.Function):
    """``F.embedding`` whose backward gives the weight's compact hook the selected entries of the looked-up rows'
    gradient instead of a dense gradient of the whole matrix."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, weight: torch.Tensor, padding_idx: int | None, handle: _Handle):
        ctx.save_for_backward(input)
        ctx.padding_idx, ctx.handle, ctx.weight_shape = padding_idx, handle, weight.shape
        return torch.nn.functional.embedding(input, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (input,) = ctx.saved_tensors
        ctx.handle.deliver(*_selected_row_gradient(input, grad_output, ctx.padding_idx, ctx.handle.indices,
                                                   ctx.weight_shape[1]))
        return None, None, None, None


def _selected_row_gradient(input: torch.Tensor, grad_output: torch.Tensor, padding_idx: int | None,
                           indices: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, values): the embedding gradient at the selected flat positions ``indices`` (sorted int32) that lie in
    looked-up rows. Each row is summed from zero in token order with ``index_add_`` (one add per token, as
    ``embedding_dense_backward_cpu`` does); rows of ``padding_idx`` get no gradient."""
    tokens = input.reshape(-1)
    grad = grad_output.reshape(-1, width)
    if padding_idx is not None:
        keep = tokens != padding_idx
        tokens, grad = tokens[keep], grad[keep]
    rows, row_of_token = torch.unique(tokens, sorted=True, return_inverse=True)
    row_sums = torch.zeros((rows.numel(), width), dtype=grad.dtype, device=grad.device)
    row_sums.index_add_(0, row_of_token, grad)
    starts = torch.searchsorted(indices, (rows * width).to(indices.dtype))
    ends = torch.searchsorted(indices, ((rows + 1) * width).to(indices.dtype))
    counts = ends - starts
    row_of_slot = torch.repeat_interleave(torch.arange(rows.numel(), device=grad.device), counts)
    offsets = torch.arange(int(counts.sum()), device=grad.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts)
    slots = torch.repeat_interleave(starts, counts) + offsets
    columns = indices[slots].long() - rows[row_of_slot] * width
    return slots, row_sums[row_of_slot, columns]


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
