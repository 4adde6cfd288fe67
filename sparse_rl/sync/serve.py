"""Stand-alone receiver process: holds a Hugging Face model in the server dtype and applies patches from rank 0.

    python -m sparse_rl.sync.serve MODEL_FOLDER MASK_FILE --host HOST --port PORT

joins a two-process group hosted by the trainer (:func:`sparse_rl.sync.transport.connect`: gloo on CPU, NCCL with
``--device cuda``) as rank 1 and runs
:func:`sparse_rl.sync.transport.serve` until the trainer sends ``STOP``. The trainer's side joins the same group as
rank 0 and delivers patches with :class:`~sparse_rl.sync.transport.DistributedPatchSink`. A receiver that restarts
joins a new group and takes an anchor first (it answers the first non-anchor patch with ``ANCHOR_NEEDED``).
"""

from __future__ import annotations

import argparse
import os

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="Hugging Face model folder (the trainer's base checkpoint)")
    parser.add_argument("mask", help="the trainer's mask file (SubnetworkMask.save)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the trainer")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    from ..mask import SubnetworkMask
    from .receiver import PatchReceiver
    from .transport import connect, serve

    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device)
    receiver = PatchReceiver(model, SubnetworkMask.load(args.mask))
    print(f"receiver ready: {sum(p.numel() for p in model.parameters()):,} parameters in {args.dtype}, "
          f"mask of {len(receiver.selections)} trained tensors", flush=True)
    group = connect(args.host, args.port, rank=1, backend="nccl" if device.type == "cuda" else "gloo",
                    timeout=args.timeout)
    serve(receiver, peer=0, group=group, device=device)


if __name__ == "__main__":
    main()
