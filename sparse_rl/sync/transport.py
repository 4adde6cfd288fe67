"""Patches between two processes over ``torch.distributed`` point-to-point (gloo on CPU; NCCL with device tensors).

The sender (the trainer's rank) and a receiver process share a process group. Each message is an int64 pair
``(kind, length)`` followed by ``length`` bytes; the receiver answers every patch with an int64 pair
``(status, sequence)``:

- ``PATCH``: encoded :class:`~sparse_rl.sync.patch.WeightPatch`; status ``OK``, ``REFUSED`` (the error text follows as
  a message) or ``ANCHOR_NEEDED`` (fresh receiver, gap, other stream: the sender answers with an anchor).
- ``FULL``: the whole model in the server dtype, one tensor per parameter in ``named_parameters()`` order, copied into
  the receiver's model (what TRL sends today; the benchmark's baseline).
- ``DIGEST``: the receiver replies with the SHA-256 of its weights' bits (:func:`weights_digest`), to check that it
  holds exactly the trainer's weights rounded to the server dtype.
- ``STOP``: the receiver leaves its loop.

:func:`connect` builds a private two-process group (a ``TCPStore`` and a ``ProcessGroupGloo``/``ProcessGroupNCCL``)
without initialising ``torch.distributed``'s default group, so a trainer that is itself a single process (or a DDP
run with its own default group) is not turned into a distributed run by the sync.

:func:`serve` is the receiver's loop; ``python -m sparse_rl.sync.serve`` runs it as a stand-alone process holding a
Hugging Face model.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta

import torch
import torch.distributed as dist

from .patch import PatchRefused, WeightPatch, encode_patch
from .receiver import AnchorNeeded, PatchReceiver

STOP, PATCH, FULL, DIGEST, TEXT = 0, 1, 2, 3, 4
OK, REFUSED, ANCHOR_NEEDED = 0, 1, 2


def weights_digest(named_parameters, dtype: torch.dtype | None = None) -> str:
    """SHA-256 over the names and bits of the parameters (cast to ``dtype`` first when given), sorted by name."""
    digest = hashlib.sha256()
    for name, param in sorted(named_parameters, key=lambda item: item[0]):
        tensor = param.detach()
        if dtype is not None:
            tensor = tensor.to(dtype)
        digest.update(name.encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def connect(host: str, port: int, rank: int, world_size: int = 2, backend: str = "gloo",
            timeout: float = 600.0):
    """A private process group of ``world_size`` processes (rank 0 hosts the store at ``host:port``)."""
    wait = timedelta(seconds=timeout)
    store = dist.TCPStore(host, port, world_size, rank == 0, timeout=wait)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, wait)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")


class Channel:
    """Typed byte messages to one peer (``group``: a process group from :func:`connect`, or None for the default
    group; ``device``: where tensors must live for the backend, CPU for gloo, the GPU for NCCL)."""

    def __init__(self, peer: int, group=None, device: torch.device | str = "cpu"):
        self.peer, self.group, self.device = peer, group, torch.device(device)

    def _send(self, tensor: torch.Tensor) -> None:
        if self.group is None:
            dist.send(tensor, self.peer)
        else:
            self.group.send([tensor], self.peer, 0).wait()

    def _recv(self, tensor: torch.Tensor) -> None:
        if self.group is None:
            dist.recv(tensor, self.peer)
        else:
            self.group.recv([tensor], self.peer, 0).wait()

    def send_header(self, kind: int, length: int) -> None:
        self._send(torch.tensor([kind, length], dtype=torch.int64, device=self.device))

    def recv_header(self) -> tuple[int, int]:
        header = torch.empty(2, dtype=torch.int64, device=self.device)
        self._recv(header)
        kind, length = header.tolist()
        return kind, length

    def send_bytes(self, kind: int, data: bytes) -> None:
        self.send_header(kind, len(data))
        if data:
            payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
            self._send(payload)

    def recv_payload(self, length: int) -> bytes:
        if not length:
            return b""
        payload = torch.empty(length, dtype=torch.uint8, device=self.device)
        self._recv(payload)
        return payload.cpu().numpy().tobytes()

    def send_tensor(self, tensor: torch.Tensor) -> None:
        self._send(tensor.to(self.device).contiguous())

    def recv_into(self, tensor: torch.Tensor) -> None:
        self._recv(tensor)


class DistributedPatchSink:
    """Sender side: delivers patches to a :func:`serve` loop on rank ``peer`` and reads its answer."""

    def __init__(self, peer: int, group=None, device: torch.device | str = "cpu"):
        self.channel = Channel(peer, group, device)

    def __call__(self, patch: WeightPatch | bytes) -> int:
        """Send ``patch``; returns the receiver's new sequence number, raises :class:`AnchorNeeded` or
        :class:`PatchRefused` (with the receiver's message) when it refused."""
        data = encode_patch(patch) if isinstance(patch, WeightPatch) else bytes(patch)
        self.channel.send_bytes(PATCH, data)
        status, sequence = self.channel.recv_header()
        if status == OK:
            return sequence
        kind, length = self.channel.recv_header()
        message = self.channel.recv_payload(length).decode()
        raise (AnchorNeeded if status == ANCHOR_NEEDED else PatchRefused)(f"receiver refused the patch: {message}")

    def send_full(self, named_tensors) -> None:
        """Send every tensor whole (the receiver copies them into its model in order); waits for the receiver."""
        tensors = list(named_tensors)
        self.channel.send_header(FULL, len(tensors))
        for _, tensor in tensors:
            self.channel.send_tensor(tensor)
        self.channel.recv_header()

    def digest(self) -> str:
        self.channel.send_header(DIGEST, 0)
        _, length = self.channel.recv_header()
        return self.channel.recv_payload(length).decode()

    def stop(self) -> None:
        self.channel.send_header(STOP, 0)


def serve(receiver: PatchReceiver, peer: int = 0, group=None, device: torch.device | str = "cpu") -> None:
    """Receiver loop: apply patches from rank ``peer`` into ``receiver``'s model until a ``STOP`` message."""
    channel = Channel(peer, group, device)
    params = list(receiver.model.named_parameters())
    while True:
        kind, length = channel.recv_header()
        if kind == STOP:
            return
        if kind == PATCH:
            data = channel.recv_payload(length)
            try:
                patch = receiver.apply(data)
            except AnchorNeeded as refusal:
                _answer_refusal(channel, ANCHOR_NEEDED, refusal)
            except PatchRefused as refusal:
                _answer_refusal(channel, REFUSED, refusal)
            else:
                channel.send_header(OK, patch.sequence)
        elif kind == FULL:
            if length != len(params):
                raise RuntimeError(f"full update announces {length} tensors, the receiver's model has {len(params)}")
            with torch.no_grad():
                for _, param in params:
                    buffer = torch.empty(param.shape, dtype=param.dtype, device=channel.device)
                    channel.recv_into(buffer)
                    param.copy_(buffer)
            channel.send_header(OK, -1)
        elif kind == DIGEST:
            channel.send_bytes(TEXT, weights_digest(params).encode())
        else:
            raise RuntimeError(f"unknown message kind {kind}")


def _answer_refusal(channel: Channel, status: int, refusal: Exception) -> None:
    channel.send_header(status, -1)
    channel.send_bytes(TEXT, str(refusal).encode())
