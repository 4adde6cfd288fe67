"""Attach the sparse weight sync to a trainer: ``attach_weight_sync(trainer, sparse, WeightSyncConfig(...), sink)``.

Two ways a sync is triggered:

- **TRL with vLLM** (``use_vllm=True``): TRL calls ``trainer.vllm_generation.sync_weights()`` whenever the global step
  moved before generating; that method is replaced by one that builds a patch and hands it to vLLM
  (:mod:`sparse_rl.sync.vllm`), so the sync happens exactly when TRL's own would.
- **any other trainer** (or a receiver of your own): a :class:`WeightSyncCallback` builds a patch every ``sync_every``
  optimizer steps (``on_step_end``, after the optimizer step) and hands it to ``sink``.

A sink is a callable taking a :class:`~sparse_rl.sync.patch.WeightPatch`; it raises
:class:`~sparse_rl.sync.receiver.AnchorNeeded` when the receiver needs an anchor (it restarted, or it missed a patch),
and the sync then sends one at once. :class:`~sparse_rl.sync.transport.DistributedPatchSink` sends over
``torch.distributed``; a :class:`~sparse_rl.sync.receiver.PatchReceiver`'s ``apply`` is an in-process sink.

Only the main process sends (every data-parallel rank holds the same weights); a trainer resumed from a checkpoint
builds a new producer, whose first patch is an anchor of a new stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import TrainerCallback

from ..mask import SubnetworkMask
from .patch import WeightPatch, dtype_from_name
from .producer import PatchProducer
from .receiver import AnchorNeeded


@dataclass
class WeightSyncConfig:
    """How the trainer's subnetwork is sent to the generation server.

    Args:
        server_dtype: dtype of the server's weights (``"bfloat16"``, ``"float16"`` or ``"float32"``).
        anchor_every: every this many syncs is a full anchor (all selected entries, no positions); 0 sends anchors
            only at the first sync, after a resume and when the receiver asks for one.
        sync_every: optimizer steps between syncs when the callback drives the sync (TRL's vLLM path syncs when TRL
            does).
        index_encoding: ``"auto"`` writes each tensor's positions in the smallest form (int32 flat indices, uint16
            ranks within the selection, or one bit per selected entry); ``"flat_i32"`` always writes int32 flat indices.
        vllm_transport: with TRL's ``vllm_mode="server"``: ``"collective_rpc"`` posts patches to
            :class:`~sparse_rl.sync.vllm.SparsePatchWorkerExtension` (validated on the server), ``"sparse_nccl"`` sends
            them through vLLM's own sparse NCCL backend (no checks on the server). Colocate mode writes in process.
        first_sync: ``"anchor"`` sends every selected entry first; ``"base"`` sends only the selected entries that
            differ from the base (what a whole-model diff sends first), which a receiver takes only if it still holds
            that base exactly (else it asks for an anchor). Attach before training for ``"base"``.
        fused_scan: ``"auto"`` lets the trainer's ``MaskedAdamW`` keep a bf16 copy of the selected entries during its
            step, so a patch compares compact vectors instead of reading the selected entries out of the dense
            parameters (:mod:`sparse_rl.sync.producer`), where it can (CPU numba path, fp32/bf16 parameters, bf16
            server); the Triton kernels on CUDA do not keep it, so CUDA trainers scan. ``"on"`` refuses a setup
            without it; ``"off"`` always scans. Same patches either way.
    """

    server_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    anchor_every: int = 100
    sync_every: int = 1
    index_encoding: Literal["auto", "flat_i32"] = "auto"
    vllm_transport: Literal["collective_rpc", "sparse_nccl"] = "collective_rpc"
    first_sync: Literal["anchor", "base"] = "anchor"
    fused_scan: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self):
        dtype_from_name(self.server_dtype)
        if self.anchor_every < 0:
            raise ValueError(f"anchor_every must be >= 0, got {self.anchor_every}")
        if self.sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {self.sync_every}")
        if self.index_encoding not in ("auto", "flat_i32"):
            raise ValueError(f"index_encoding must be 'auto' or 'flat_i32', got {self.index_encoding!r}")
        if self.first_sync not in ("anchor", "base"):
            raise ValueError(f"first_sync must be 'anchor' or 'base', got {self.first_sync!r}")
        if self.fused_scan not in ("auto", "on", "off"):
            raise ValueError(f"fused_scan must be 'auto', 'on' or 'off', got {self.fused_scan!r}")
        if self.vllm_transport not in ("collective_rpc", "sparse_nccl"):
            raise ValueError(f"vllm_transport must be 'collective_rpc' or 'sparse_nccl', got {self.vllm_transport!r}")


@dataclass
class WeightSync:
    """A producer and where its patches go; ``sync()`` sends one patch (an anchor when one is due or asked for)."""

    producer: PatchProducer
    sink: Callable[[WeightPatch], object]
    history: list[dict] = field(default_factory=list)
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def sync(self) -> WeightPatch:
        patch = self.producer.build()
        try:
            self.sink(patch)
        except AnchorNeeded:
            self.producer.request_anchor()
            patch = self.producer.build()
            self.sink(patch)
        self.history.append({"sequence": patch.sequence, "anchor": patch.anchor, "values": patch.num_values,
                             "payload_bytes": patch.payload_nbytes()})
        return patch

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self.producer.close()


class WeightSyncCallback(TrainerCallback):
    """Syncs after every ``sync_every``-th optimizer step (``on_step_end`` runs after ``optimizer.step()``)."""

    def __init__(self, weight_sync: WeightSync, sync_every: int, is_main_process: Callable[[], bool]):
        self.weight_sync, self.sync_every, self.is_main_process = weight_sync, sync_every, is_main_process

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.sync_every == 0 and self.is_main_process():
            self.weight_sync.sync()


def attach_weight_sync(trainer, sparse, config: WeightSyncConfig | None = None,
                       sink: Callable[[WeightPatch], object] | None = None, mask_path: str | None = None) -> WeightSync:
    """Send ``trainer``'s subnetwork to a generation server after optimizer steps (see the module docstring).

    ``sparse`` is what ``sparsify`` returned (or the :class:`SubnetworkMask` itself). With TRL's ``use_vllm=True`` and
    no ``sink``, the patches go to vLLM (:func:`sparse_rl.sync.vllm.attach_to_vllm_generation`); otherwise ``sink``
    is required (``mask_path``: the mask file the vLLM server loads, for ``vllm_transport="collective_rpc"``).
    ``WeightSync.remove()`` detaches it.
    """
    config = config or WeightSyncConfig()
    mask = sparse if isinstance(sparse, SubnetworkMask) else sparse.mask
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    producer = PatchProducer(model, mask, server_dtype=dtype_from_name(config.server_dtype),
                             anchor_every=config.anchor_every, index_encoding=config.index_encoding,
                             first_sync=config.first_sync, optimizer=lambda: getattr(trainer, "optimizer", None),
                             fused_scan=config.fused_scan)
    vllm_generation = getattr(trainer, "vllm_generation", None)
    if sink is None:
        if vllm_generation is None:
            raise ValueError("attach_weight_sync needs a sink (e.g. DistributedPatchSink, or a PatchReceiver's apply) "
                             "unless the trainer generates with vLLM (use_vllm=True)")
        from .vllm import attach_to_vllm_generation

        return attach_to_vllm_generation(vllm_generation, producer, mask, transport=config.vllm_transport,
                                         mask_path=mask_path)
    weight_sync = WeightSync(producer, sink)
    state = getattr(trainer.accelerator, "is_main_process", True) if hasattr(trainer, "accelerator") else True
    callback = WeightSyncCallback(weight_sync, config.sync_every, lambda: bool(state))
    trainer.add_callback(callback)
    weight_sync._undo.append(lambda: trainer.remove_callback(callback))
    return weight_sync


def rounded_weights(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's parameters cast to ``dtype``: what a synced receiver must hold, bit for bit."""
    return {name: param.detach().to(dtype) for name, param in model.named_parameters()}
