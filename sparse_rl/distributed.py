"""One mask on every process of a data-parallel run (``accelerate launch`` / ``torchrun``, DDP).

Under DDP every rank holds the whole model and steps it with its own :class:`~sparse_rl.optim.MaskedAdamW`. The ranks
stay identical only if they all mask the same entries: DDP averages the (already masked) gradients, and each rank's
optimizer then updates its own selection. Two ways a mask reaches the ranks:

- **discovered** (the gradient probe): every rank probes its own shard of the data, so the masks differ. All ranks
  run the probe together (its forward/backward and GRPO's reward gathering are collective), then rank 0's mask is
  broadcast (:func:`broadcast_mask`).
- **deterministic** (random with a seed, a :class:`SubnetworkMask` passed in, a mask file): every rank built it
  alone and it must already agree. Only a SHA-256 digest per tensor crosses the processes
  (:func:`check_masks_agree`); a difference raises :class:`MaskMismatchError` on every rank, naming the tensor and
  the ranks, instead of letting the replicas drift apart silently.

Without ``torch.distributed`` (or with a single process) every function returns at once.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.distributed as dist

from .mask import SubnetworkMask


class MaskMismatchError(ValueError):
    """The processes of a distributed run hold different masks."""


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree_on_mask(mask: SubnetworkMask, *, discovered: bool) -> SubnetworkMask:
    """The mask every process trains with: rank 0's for a ``discovered`` mask, else ``mask`` after checking that all
    processes hold the same one."""
    if not is_distributed():
        return mask
    if discovered:
        return broadcast_mask(mask)
    check_masks_agree(mask)
    return mask


def broadcast_mask(mask: SubnetworkMask, src: int = 0) -> SubnetworkMask:
    """Rank ``src``'s mask on every process, sent as packed bits (1 bit per entry) one tensor at a time.

    Every process must pass a mask over the same parameter names and shapes (its own, e.g. from its own probe);
    otherwise all of them raise :class:`MaskMismatchError` before anything is sent.
    """
    if not is_distributed():
        return mask
    structures = _all_gather({name: tuple(selection.shape) for name, selection in mask.items()})
    for rank, structure in enumerate(structures):
        if structure != structures[src]:
            raise MaskMismatchError(
                f"rank {rank} built a mask over different parameters than rank {src} "
                f"({_first_structure_difference(structures[src], structure)}); every process must load the same "
                "model with the same exclude patterns")
    device = _collective_device()
    selections = {}
    for name, selection in mask.items():
        packed = torch.from_numpy(_packed_bits(selection)).to(device)
        dist.broadcast(packed, src=src)
        bits = np.unpackbits(packed.cpu().numpy(), count=selection.numel()).astype(bool)
        selections[name] = torch.from_numpy(bits).reshape(selection.shape)
    return SubnetworkMask(selections)


def check_masks_agree(mask: SubnetworkMask) -> None:
    """Raise :class:`MaskMismatchError` on every process unless all processes hold the same mask.

    Compares a SHA-256 digest of each tensor's name, shape and packed bits, so only a few bytes per tensor are sent.
    """
    if not is_distributed():
        return
    digests = _all_gather(mask_digests(mask))
    reference = digests[0]
    for rank, theirs in enumerate(digests[1:], start=1):
        if theirs == reference:
            continue
        names = list(dict.fromkeys(list(reference) + list(theirs)))
        differing = [name for name in names if reference.get(name) != theirs.get(name)]
        raise MaskMismatchError(
            f"rank {rank} holds a different mask than rank 0 ({len(differing)} tensor(s) differ, first "
            f"{differing[0]!r}); a seeded or loaded mask must be the same on every process: use the same seed and "
            "mask file everywhere, or let gradient discovery broadcast rank 0's mask")


def mask_digests(mask: SubnetworkMask) -> dict[str, str]:
    """SHA-256 hex digest of each tensor's name, shape and packed selection bits."""
    digests = {}
    for name, selection in mask.items():
        digest = hashlib.sha256(f"{name}:{tuple(selection.shape)}:".encode())
        digest.update(_packed_bits(selection).tobytes())
        digests[name] = digest.hexdigest()
    return digests


def _packed_bits(selection: torch.Tensor) -> np.ndarray:
    return np.packbits(selection.reshape(-1).numpy())


def _all_gather(value) -> list:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _collective_device() -> torch.device:
    """Where tensors for the default group's collectives must live: CPU for gloo/mpi, else the current accelerator
    (NCCL and the other device backends only move device tensors)."""
    backend = str(dist.get_backend())
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None:
        return torch.device("cpu")
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def _first_structure_difference(expected: dict, found: dict) -> str:
    for name, shape in expected.items():
        if name not in found:
            return f"it has no {name!r}"
        if found[name] != shape:
            return f"{name!r} has shape {found[name]} instead of {shape}"
    extra = next(name for name in found if name not in expected)
    return f"it has {extra!r}, which the source rank's mask does not"
