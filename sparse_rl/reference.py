"""A reference model that costs d·N values instead of a second copy of N.

DPO, KTO and KL-regularised GRPO/RLOO score every batch with a frozen copy of the starting model. When only the
entries of a :class:`SubnetworkMask` are trained, the policy still *is* that starting model everywhere else, so the
reference can be the policy itself with the original values of the selected entries swapped in for the forward pass::

    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    sparsify(trainer, SparseConfig(density=0.1, shared_reference=True))  # frees TRL's copy of the model
    trainer.train()

The copy TRL loaded in the constructor still sets the process's peak memory. To never load it, build the trainer
with :func:`sparse_rl.trl.build_trainer` (DPO, KTO, GRPO, RLOO), which hands TRL an *unbound* ``SharedReference``
that ``sparsify`` binds to the mask it chooses::

    trainer = build_trainer(DPOTrainer, SparseConfig(density=0.1, shared_reference=True),
                            model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()

(DPO and KTO take ``ref_model=`` directly: ``DPOTrainer(model=model, ref_model=SharedReference(model), ...)``,
then ``sparsify(trainer, SparseConfig(shared_reference=True, ...))``.)

On CPU the swap exchanges the policy's and the stored values in one in-place pass (a numba loop over the mask's
packed bits, values moved as bits: :mod:`sparse_rl.restrict.bitscan`), holding nothing but the values; other devices
use ``index_select``/``index_copy_`` with int32 positions through a scratch buffer.

How each TRL 1.16 trainer calls its reference, and why the swap is safe there:

- DPO and KTO run the policy forward (with grad) *first*, then ``self.ref_model(..., fused_lm_head=True)`` under
  ``torch.no_grad()``, then the backward. The policy's saved activations reference the weight tensors, so the
  reference forward must leave both their values and their autograd version counters as they were. The swap writes
  through ``param.data`` (which has its own version counter, so backward raises no "modified by an inplace operation"
  error) and puts the trained values back, bit for bit, before returning, also when the forward raises. GRPO and RLOO
  score the reference in ``_generate_and_score_completions`` under ``torch.no_grad()``, before the training forward.
- Under mixed precision, autocast caches the low-precision copy of each weight that requires grad until the outermost
  autocast region exits; a reference forward inside the policy's region would read the cached *trained* weights. The
  swap clears the autocast cache and disables it during the reference forward.
- TRL's reference copy is in eval mode (no dropout); the policy is put in eval mode for the reference forward and its
  per-module training flags are restored afterwards.
- TRL patches the reference's ``forward`` (fused LM head, accelerate's autocast wrapper). The policy carries the same
  patches, with the same temperature, so the shared reference calls the policy and ignores patches made to itself.

Unsupported, with a clear error: ``sync_ref_model=True`` (the reference drifts towards the policy),
``precompute_ref_log_probs=True`` (there is no reference model left to share), PEFT models and ``beta=0`` GRPO/RLOO
(no reference model at all).
"""

from __future__ import annotations

import contextlib
import gc
import math

import torch

from .mask import SubnetworkMask
from .restrict import bitscan


class SharedReference(torch.nn.Module):
    """The starting weights of ``policy``, stored as the original values of ``mask``'s selected entries.

    Calling it runs ``policy`` under ``torch.no_grad()`` in eval mode with those values swapped in, and swaps the
    trained values back before returning. The policy is not a submodule: ``.to()``, ``.parameters()`` and TRL's
    reference-model set-up reach only the stored values (buffers), never the policy's weights. Valid as long as
    training changes only entries inside ``mask`` (what ``sparsify`` guarantees).

    Built without a mask (``SharedReference(policy)``) it is *unbound*: it stores nothing yet and is what a trainer
    gets as ``ref_model=`` before the mask is known (:func:`sparse_rl.trl.build_trainer`). ``sparsify`` binds it to
    the mask it chose, while the policy still holds its starting values; until then it refuses to run, except while
    ``sparsify`` probes the loss to choose the mask (the policy *is* the reference then, see :meth:`standing_in`).
    """

    def __init__(self, policy: torch.nn.Module, mask: SubnetworkMask | None = None):
        super().__init__()
        if isinstance(policy, SharedReference):
            raise TypeError("policy is already a SharedReference")
        if not isinstance(policy, torch.nn.Module):
            raise TypeError(f"policy must be a torch.nn.Module, got {type(policy).__name__}")
        object.__setattr__(self, "_policy", policy)  # bypass nn.Module registration on purpose
        self.config = getattr(policy, "config", None)
        self.mask: SubnetworkMask | None = None
        self._names: list[str] = []
        self._swapped = False
        self._standing_in = False
        if mask is not None:
            self.bind(mask)

    @property
    def policy(self) -> torch.nn.Module:
        return self._policy

    @property
    def is_bound(self) -> bool:
        return self.mask is not None

    def bind(self, mask: SubnetworkMask) -> SharedReference:
        """Store the policy's current values of ``mask``'s selected entries: from here on this reference is the
        policy as it is now. Call it before any training step."""
        if self.mask is not None:
            raise RuntimeError("this SharedReference is already bound to a mask")
        named = list(self._policy.named_parameters())
        mask.check_matches(named)
        params = dict(named)
        with torch.no_grad():
            for name in mask:
                if mask.count(name) == 0:
                    continue
                param = params[name]
                if not param.is_contiguous():
                    raise ValueError(f"parameter {name!r} is not contiguous; the shared reference swaps entries "
                                     "through a flat view")
                slot = len(self._names)
                flat = param.detach().view(-1)
                if bitscan.walks(param):  # CPU: values gathered and later swapped straight from the packed bits
                    values = bitscan.gather_selected(flat, mask.packed_bits(name), mask.count(name))
                else:
                    index = self._index(mask, name, param.device)
                    self.register_buffer(f"index_{slot}", index, persistent=False)
                    values = flat.index_select(0, index)
                self.register_buffer(f"values_{slot}", values, persistent=False)
                self._names.append(name)
        self.mask = mask
        return self

    def value_bytes(self) -> int:
        """Bytes of the stored starting values alone."""
        return sum(getattr(self, f"values_{slot}").numel() * getattr(self, f"values_{slot}").element_size()
                   for slot in range(len(self._names)))

    def extra_bytes(self) -> int:
        """Bytes this reference holds: the original selected values, plus, off CPU (or without numba), their int32
        positions (the same tensors as the compact gradient hooks', :meth:`~sparse_rl.mask.SubnetworkMask.
        selected_indices`) and a scratch buffer of the largest tensor's entries, grown on first use. On CPU the swap
        walks the mask's packed bits in place and holds nothing else."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @staticmethod
    def _index(mask: SubnetworkMask, name: str, device: torch.device) -> torch.Tensor:
        if math.prod(mask.shape_of(name)) < 2**31:  # the compact gradient hook's int32 positions, shared with it
            return mask.selected_indices(name, device)
        return mask.flat_indices(name).to(device)

    def __repr__(self) -> str:
        if self.mask is None:
            return f"SharedReference(policy={type(self._policy).__name__}, unbound)"
        return (f"SharedReference(policy={type(self._policy).__name__}, {self.mask.num_selected:,} stored values, "
                f"{self.extra_bytes() / 2**20:.1f} MiB)")

    @contextlib.contextmanager
    def standing_in(self):
        """Inside, an unbound reference runs the policy as it is: what ``sparsify`` uses while it probes the loss to
        choose the mask, before any training step (the policy still equals its starting model)."""
        previous, self._standing_in = self._standing_in, True
        try:
            yield self
        finally:
            self._standing_in = previous

    # ------------------------------------------------------------------ swapping
    def _swap(self, params: dict[str, torch.nn.Parameter], slot: int) -> None:
        """Exchange the policy's values at the selected entries with the stored ones (an involution, bitwise)."""
        name = self._names[slot]
        param = params[name]
        stored = getattr(self, f"values_{slot}")
        if stored.device != param.device:  # the policy was moved after this reference was built
            stored = stored.to(param.device)
            setattr(self, f"values_{slot}", stored)
        if stored.dtype != param.dtype:
            raise RuntimeError(f"{name!r} is {param.dtype} now but was {stored.dtype} when the reference was built")
        flat = param.data.view(-1)  # .data: no autograd version bump (see module docstring)
        if bitscan.walks(param):
            bitscan.swap_selected(flat, self.mask.packed_bits(name), stored)
            return
        index = getattr(self, f"index_{slot}", None)
        if index is None or index.device != param.device:  # bound on CPU, moved since (or numba went missing)
            index = self._index(self.mask, name, param.device)
            self.register_buffer(f"index_{slot}", index, persistent=False)
        current = self._scratch("scratch_values", index.numel(), param.dtype, param.device)
        torch.index_select(flat, 0, index, out=current)
        index64 = self._scratch("scratch_index", index.numel(), torch.int64, param.device)
        index64.copy_(index)  # index_copy_ needs int64; it is faster than index_put_ with int32
        flat.index_copy_(0, index64, stored)
        stored.copy_(current)

    def _scratch(self, name: str, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``count`` elements of ``dtype`` viewed from a reusable byte buffer (regrown only if too small)."""
        buffer = getattr(self, name, None)
        needed = count * dtype.itemsize
        if buffer is None or buffer.device != device or buffer.numel() < needed:
            size = max(needed, 0 if buffer is None else buffer.numel())
            buffer = torch.empty(size, dtype=torch.uint8, device=device)
            if name in self._buffers:
                setattr(self, name, buffer)
            else:
                self.register_buffer(name, buffer, persistent=False)
        return buffer[:needed].view(dtype)

    @contextlib.contextmanager
    def swapped(self):
        """Inside, the policy holds its starting values; the trained ones come back on exit, also on error."""
        if self.mask is None:
            if not self._standing_in:
                raise RuntimeError(
                    "this SharedReference is unbound: it stores no starting values until sparsify binds it to the "
                    "mask (sparsify(trainer, SparseConfig(shared_reference=True)) or sparse_rl.trl.build_trainer)")
            yield self._policy
            return
        if self._swapped:
            raise RuntimeError("the shared reference is already swapped in (nested reference forward)")
        params = dict(self._policy.named_parameters())
        done: list[int] = []
        self._swapped = True
        try:
            with torch.no_grad():
                for slot in range(len(self._names)):
                    self._swap(params, slot)
                    done.append(slot)
            yield self._policy
        finally:
            with torch.no_grad():
                for slot in reversed(done):
                    self._swap(params, slot)
            self._swapped = False

    def forward(self, *args, **kwargs):
        with self.swapped(), torch.no_grad(), _eval_mode(self._policy), _without_autocast_cache():
            return self._policy(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        # TRL and accelerate replace the *instance* ``forward`` of reference models; the policy already carries the
        # same patches, so always run the class's own forward.
        return SharedReference.forward(self, *args, **kwargs)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def _without_autocast_cache():
    enabled = torch.is_autocast_cache_enabled()
    torch.clear_autocast_cache()  # low-precision copies of the trained weights
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(enabled)
        torch.clear_autocast_cache()  # anything an inner region cached from the swapped-in values


def check_shared_reference_possible(trainer) -> None:
    """Refuse trainers whose reference cannot be shared, before anything is changed (``sparsify`` calls this ahead
    of its own changes so that a refusal leaves the trainer untouched)."""
    if not hasattr(trainer, "ref_model"):
        raise TypeError(f"{type(trainer).__name__} has no ref_model; shared references plug into DPOTrainer, "
                        "KTOTrainer, GRPOTrainer and RLOOTrainer")
    if getattr(trainer, "is_fsdp_enabled", False):
        raise ValueError("shared_reference swaps whole parameters of the policy, but under FSDP each process holds "
                         "only a shard of them; keep TRL's reference copy (shared_reference=False) with FSDP2")
    args = trainer.args
    if getattr(args, "sync_ref_model", False):
        raise ValueError("sync_ref_model=True moves the reference towards the policy, so it is no longer the starting "
                         "model a shared reference stores; set sync_ref_model=False")
    if getattr(args, "precompute_ref_log_probs", False):
        raise ValueError("precompute_ref_log_probs=True: the reference log-probs were computed at construction and "
                         "no reference model is kept, so there is nothing to share")
    if hasattr(trainer.model, "peft_config"):
        raise ValueError("PEFT models get their reference by disabling the adapter; a shared reference is for "
                         "subnetwork training of the full model")
    if trainer.ref_model is None:
        raise ValueError(f"{type(trainer).__name__} keeps no reference model (beta=0.0?), so there is nothing to "
                         "replace")
    if isinstance(trainer.ref_model, SharedReference):
        if trainer.ref_model.policy is not trainer.accelerator.unwrap_model(trainer.model):
            raise ValueError("the trainer's SharedReference was built for another policy model")
    else:
        unwrap = trainer.accelerator.unwrap_model
        _check_same_weights(unwrap(trainer.model), unwrap(trainer.ref_model))


def check_reference_covers(trainer, mask: SubnetworkMask) -> None:
    """Refuse a :class:`SharedReference` already on the trainer (passed as ``ref_model=``) that does not store the
    starting value of every entry ``mask`` trains, or that stands for another model."""
    existing = getattr(trainer, "ref_model", None)
    if not isinstance(existing, SharedReference) or not existing.is_bound:
        return  # an unbound one is bound to ``mask`` by install_shared_reference
    if existing.policy is not trainer.accelerator.unwrap_model(trainer.model):
        raise ValueError("the trainer's SharedReference was built for another policy model")
    outside = sum(int((s & ~existing.mask[n]).sum()) if n in existing.mask else int(s.sum()) for n, s in mask.items())
    if outside:
        raise ValueError(f"the trainer trains {outside} entries outside its SharedReference's mask; the shared "
                         "reference must cover every trained entry (build it with the mask passed to sparsify)")


def install_shared_reference(trainer, mask: SubnetworkMask) -> SharedReference:
    """Replace the trainer's reference model by a :class:`SharedReference` of its policy and free the copy; what
    ``SparseConfig(shared_reference=True)`` does. ``sparsify`` runs :func:`check_shared_reference_possible` and
    :func:`check_reference_covers` before changing anything; the existing reference must equal the policy entry for
    entry (it does when TRL built it from the policy's checkpoint). An unbound :class:`SharedReference` (TRL never
    built a copy) is bound to ``mask`` here, before any training step."""
    policy = trainer.accelerator.unwrap_model(trainer.model)
    existing = trainer.ref_model
    if isinstance(existing, SharedReference):  # passed as ref_model= and checked by check_reference_covers
        return existing if existing.is_bound else existing.bind(mask)

    shared = SharedReference(policy, mask)
    trainer.ref_model = shared
    models = getattr(trainer.accelerator, "_models", [])
    models[:] = [m for m in models if m is not existing]
    del existing
    gc.collect()
    return shared


def _check_same_weights(policy: torch.nn.Module, reference: torch.nn.Module) -> None:
    mine, theirs = dict(policy.named_parameters()), dict(reference.named_parameters())
    if mine.keys() != theirs.keys():
        missing = sorted(mine.keys() ^ theirs.keys())
        raise ValueError(f"the reference model's parameters differ from the policy's (e.g. {missing[:3]}); a shared "
                         "reference can only stand for the policy's own starting weights")
    with torch.no_grad():
        for name, param in mine.items():
            other = theirs[name]
            if other.shape != param.shape or other.dtype != param.dtype:
                raise ValueError(f"reference {name!r} is {other.dtype}{tuple(other.shape)}, the policy's is "
                                 f"{param.dtype}{tuple(param.shape)}")
            if not torch.equal(param, other.to(param.device)):
                raise ValueError(f"the reference model differs from the policy at {name!r}: it was loaded from other "
                                 "weights, or the policy has already been trained; a shared reference stores only "
                                 "the policy's own starting values")
