"""Stand-alone receiver process: holds a Hugging Face model in the server dtype and applies patches from rank 0.

    python -m sparse_rl.sync.serve MODEL_FOLDER MASK_FILE --init-method tcp://HOST:PORT [--rank 1 --world-size 2]

joins a ``torch.distributed`` group (gloo on CPU, NCCL with ``--device cuda``) as ``--rank`` and runs
:func:`sparse_rl.sync.transport.serve` until the trainer sends ``STOP``. The trainer's side joins the same group as
rank 0 and delivers patches with :class:`~sparse_rl.sync.transport.DistributedPatchSink`. A receiver that restarts
joins a new group and takes an anchor first (it answers the first non-anchor patch with ``ANCHOR_NEEDED``).
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="Hugging Face model folder (the trainer's base checkpoint)")
    parser.add_argument("mask", help="the trainer's mask file (SubnetworkMask.save)")
    parser.add_argument("--init-method", required=True)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the trainer")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    from ..mask import SubnetworkMask
    from .receiver import PatchReceiver
    from .transport import serve

    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device)
    receiver = PatchReceiver(model, SubnetworkMask.load(args.mask))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=args.init_method, rank=args.rank, world_size=args.world_size,
                            timeout=timedelta(seconds=args.timeout))
    try:
        serve(receiver, peer=0, device=device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
