"""One mask on every process of a data-parallel run (``accelerate launch`` / ``torchrun``, DDP).

Under DDP every rank holds the whole model and steps it with its own :class:`~sparse_rl.optim.MaskedAdamW`. The ranks
stay identical only if they all mask the same entries: DDP averages the (already masked) gradients, and each rank's
optimizer then updates its own selection. Two ways a mask reaches the ranks:

- **discovered** (the gradient probe): every rank probes its own shard of the data, but each probe step's gradient
  is averaged over the ranks before it is scored (:func:`average_gradients`, what DDP does to a training step's
  gradient), so every rank scores the global batch and selects the same entries. The probe runs before
  ``Trainer.train()`` wraps the model in DDP, so without this its gradients would be the rank's own.
- **deterministic** (random with a seed, a :class:`SubnetworkMask` passed in, a mask file): every rank built it
  alone.

Either way the ranks end with masks that must already agree; only a SHA-256 digest per tensor crosses the processes
(:func:`check_masks_agree`), and a difference raises :class:`MaskMismatchError` on every rank, naming the tensor and
the ranks, instead of letting the replicas drift apart silently. (All-reduce hands every rank the same bits, with gloo
and NCCL alike; DDP's replicas rely on that too.)

Without ``torch.distributed`` (or with a single process) every function returns at once (:func:`average_gradients`
yields the gradients as they are).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from .mask import SubnetworkMask


class MaskMismatchError(ValueError):
    """The processes of a distributed run hold different masks."""


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree_on_mask(mask: SubnetworkMask, *, discovered: bool) -> SubnetworkMask:
    """``mask``, after checking that every process holds the same one (:func:`check_masks_agree`); ``discovered``
    (a gradient-probe mask) only changes the advice given when they differ."""
    if is_distributed():
        check_masks_agree(mask, discovered=discovered)
    return mask


def average_gradients(params: Sequence[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Each parameter's ``.grad`` averaged over the processes in fp32, one tensor at a time, as DDP averages a
    training step's gradients: the gradient of the global batch's loss when every process's loss is its shard's
    share. May reduce into ``.grad`` itself.

    A parameter without a gradient on any process is skipped (as AdamW skips it); a process without one adds zeros.
    Collective: every process must call it with the same names and shapes in the same order
    (:func:`check_same_parameters`). In a single process it yields the gradients as they are.
    """
    if not is_distributed():
        yield from ((name, param.grad.float()) for name, param in params if param.grad is not None)
        return
    device = _collective_device()
    present = torch.tensor([param.grad is not None for _, param in params], dtype=torch.int32, device=device)
    dist.all_reduce(present)
    world_size = dist.get_world_size()
    for (name, param), count in zip(params, present.tolist()):
        if count == 0:
            continue
        if param.grad is None:
            grad = torch.zeros(param.shape, dtype=torch.float32, device=device)
        else:
            grad = param.grad.detach().to(device=device, dtype=torch.float32)
        dist.all_reduce(grad)
        yield name, grad.div_(world_size)


def check_same_parameters(params: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Raise :class:`MaskMismatchError` on every process unless all pass the same names and shapes in the same
    order: a collective over mismatched tensors would hang or mix unrelated gradients."""
    if not is_distributed():
        return
    structures = _all_gather([(name, tuple(param.shape)) for name, param in params])
    for rank, structure in enumerate(structures[1:], start=1):
        if structure != structures[0]:
            raise MaskMismatchError(
                f"rank {rank} probes different parameters than rank 0 "
                f"({_first_structure_difference(dict(structures[0]), dict(structure))}); every process must load "
                "the same model with the same exclude patterns")


def check_masks_agree(mask: SubnetworkMask, *, discovered: bool = False) -> None:
    """Raise :class:`MaskMismatchError` on every process unless all processes hold the same mask.

    Compares a SHA-256 digest of each tensor's name, shape and packed bits, so only a few bytes per tensor are sent.
    ``discovered`` says the mask came from the gradient probe, for the advice in the error.
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
        advice = (
            "the gradient probe scores gradients averaged over all processes, so this means their weights differ "
            "(the 'precision' score reads them) or the all-reduce gave them different values: load the same "
            "checkpoint on every process"
            if discovered else
            "a seeded or loaded mask must be the same on every process: use the same seed and mask file everywhere, "
            "or let gradient discovery pick the mask")
        raise MaskMismatchError(
            f"rank {rank} holds a different mask than rank 0 ({len(differing)} tensor(s) differ, first "
            f"{differing[0]!r}); {advice}")


def mask_digests(mask: SubnetworkMask) -> dict[str, str]:
    """SHA-256 hex digest of each tensor's name, shape and packed selection bits."""
    return mask.digests()


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
    extra = next((name for name in found if name not in expected), None)
    if extra is None:
        return "the same parameters in another order"
    return f"it has {extra!r}, which rank 0 does not"
