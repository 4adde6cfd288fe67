"""Sparsified trainers under DDP (gloo, CPU) for tests/test_ddp.py.

Each scenario runs on every process and writes ``OUT/<scenario>-rank<r>.pt`` with what that rank saw; the tests
compare ranks with each other and with a one-process run of the same function. Two ways in:

- :func:`run_forked` forks the test process ``world_size`` times with the environment ``torchrun`` would set
  (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``): the children inherit the imports, so
  a 2-process run costs seconds instead of two fresh imports of torch/transformers/TRL.
- the command line, as a user would launch it::

      torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py CHECKPOINT OUT [SCENARIO ...]

``use_cpu=True`` makes accelerate pick ``MULTI_CPU`` with the gloo backend once ``LOCAL_RANK`` is set, and
Trainer wraps the model in ``DistributedDataParallel`` at ``train()``, i.e. after ``sparsify``.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch.distributed as dist  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from sparse_rl import SparseConfig, distributed, sparsify  # noqa: E402
from sparse_rl.distributed import MaskMismatchError, broadcast_mask, check_masks_agree  # noqa: E402
from sparse_rl.entropy import select_high_entropy_tokens  # noqa: E402
from sparse_rl.mask import SubnetworkMask  # noqa: E402
from tests.trl_cases import build_trainer, snapshot  # noqa: E402

DPO_STEPS = 3
GLOBAL_BATCH = 4  # preference pairs per optimizer step, summed over processes
# A random mask and the global entropy threshold: the result depends on the all-reduce, the batch split and the gather.
# At q = 0.2 the ranks' shares of the globally kept tokens differ from 20% each, so a rank-local threshold would keep
# other tokens (at q = 0.5 this batch happens to split evenly and could not tell).
DPO_CONFIG = SparseConfig(discovery="random", density=0.3, entropy_quantile=0.2)
ENTROPY_QUANTILE = 0.3


class RecordGradients(TrainerCallback):
    """Copies ``.grad`` at the first ``on_pre_optimizer_step``: after the hooks' masking and DDP's all-reduce."""

    def __init__(self):
        self.gradients = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.gradients is None:
            self.gradients = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run_dpo(checkpoint, output_dir, world_size: int, config: SparseConfig = DPO_CONFIG, steps: int = DPO_STEPS,
            refused_config: SparseConfig | None = None) -> dict:
    """A sparse DPO run whose optimizer steps see the same ``GLOBAL_BATCH`` pairs whatever ``world_size`` is: the
    sampler is sequential and accelerate hands process ``r`` the ``r``-th slice of every global batch. DPO's data is
    fixed (no sampling), so a 1-process run on the global batch is the exact reference.

    ``refused_config`` is tried first and must raise :class:`MaskMismatchError`; its message is returned."""
    trainer = build_trainer("dpo", checkpoint, output_dir, max_steps=steps, learning_rate=1e-3,
                            per_device_train_batch_size=GLOBAL_BATCH // world_size,
                            train_sampling_strategy="sequential")
    result = {"initial": snapshot(trainer.model)}
    if refused_config is not None:
        try:
            sparsify(trainer, refused_config)
        except MaskMismatchError as error:
            result["refusal"] = str(error)
        result["sparsified_after_refusal"] = getattr(trainer, "sparse_training", None) is not None
    sparse = sparsify(trainer, config)
    recorder = RecordGradients()
    trainer.add_callback(recorder)
    trainer.train()
    result.update(mask=sparse.mask, final=snapshot(trainer.model), gradients=recorder.gradients,
                  entropy_thresholds=[log["sparse/entropy_threshold"] for log in trainer.state.log_history
                                      if "sparse/entropy_threshold" in log])
    return result


def run_grpo_probe(checkpoint, output_dir) -> dict:
    """GRPO with gradient discovery: every rank probes its own prompts (generation and reward gathering are
    collective, so all ranks must probe together) and rank 0's mask is broadcast. The mask each rank handed to the
    broadcast is recorded."""
    handed_over = []

    def recording_broadcast(mask, src=0):
        handed_over.append(mask)
        return broadcast_mask(mask, src)

    trainer = build_trainer("grpo", checkpoint, output_dir, max_steps=1, per_device_train_batch_size=4)
    initial = snapshot(trainer.model)
    distributed.broadcast_mask = recording_broadcast
    try:
        sparse = sparsify(trainer, SparseConfig(density=0.2, probe_steps=2))
    finally:
        distributed.broadcast_mask = broadcast_mask
    trainer.train()
    return {"initial": initial, "local_mask": handed_over[0], "mask": sparse.mask, "final": snapshot(trainer.model)}


def entropy_shard(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s per-token entropies; ranks hold different numbers of rows and of valid tokens."""
    generator = torch.Generator().manual_seed(100 + rank)
    entropy = torch.rand(3 + rank, 7, generator=generator) * 4
    valid = torch.rand(3 + rank, 7, generator=generator) < 0.8
    return entropy, valid


def run_collectives(rank: int) -> dict:
    """The entropy threshold over all processes' tokens, and the errors of mismatched masks (raised on every rank)."""
    entropy, valid = entropy_shard(rank)
    selection = select_high_entropy_tokens(entropy, valid, quantile=ENTROPY_QUANTILE)
    result = {"keep": selection.keep, "threshold": selection.threshold, "num_kept": selection.num_kept,
              "num_valid": selection.num_valid}
    base = {"a": torch.tensor([True, False, True]), "b": torch.zeros(2, 2, dtype=torch.bool)}
    extra = {"c": torch.ones(1, dtype=torch.bool)} if rank == 1 else {}
    for name, call in {
        "broadcast_structure": lambda: broadcast_mask(SubnetworkMask({**base, **extra})),
        "check_one_bit": lambda: check_masks_agree(SubnetworkMask({**base, "a": torch.tensor([True, rank == 1,
                                                                                              True])})),
    }.items():
        try:
            call()
            result[name] = None
        except MaskMismatchError as error:
            result[name] = str(error)
    return result


SCENARIOS = {
    "dpo": lambda checkpoint, out, rank: run_dpo(checkpoint, out / "dpo", int(os.environ["WORLD_SIZE"]),
                                                 refused_config=SparseConfig(discovery="random", seed=rank)),
    "grpo_gradient": lambda checkpoint, out, rank: run_grpo_probe(checkpoint, out / "grpo_gradient"),
    # needs the process group that the trainers above initialised
    "collectives": lambda checkpoint, out, rank: run_collectives(rank),
}


def main(checkpoint: str, out: str, scenarios: list[str] | None = None) -> None:
    torch.set_num_threads(1)  # the processes share the machine's cores
    out = Path(out)
    for name in scenarios or list(SCENARIOS):
        began = time.perf_counter()
        result = SCENARIOS[name](checkpoint, out, int(os.environ["RANK"]))
        torch.save({**result, "world_size": dist.get_world_size(), "seconds": time.perf_counter() - began},
                   out / f"{name}-rank{dist.get_rank()}.pt")
    dist.barrier()


def run_forked(checkpoint, out, world_size: int = 2, scenarios: list[str] | None = None, timeout: float = 300):
    """Run :func:`main` in ``world_size`` forked processes; raises with each failing rank's traceback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_forked_rank, args=(rank, world_size, port, checkpoint, out, scenarios))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    failures = {rank: Path(out, f"error-rank{rank}.txt") for rank, p in enumerate(processes) if p.exitcode != 0}
    if hung or failures:
        details = "\n".join(f"rank {rank}:\n{path.read_text() if path.exists() else 'no traceback'}"
                            for rank, path in failures.items())
        raise RuntimeError(f"DDP run failed (ranks still running after {timeout} s: {hung})\n{details}")


def _forked_rank(rank: int, world_size: int, port: int, checkpoint, out, scenarios) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code = 0
    try:
        main(checkpoint, out, scenarios)
    except BaseException:
        Path(out, f"error-rank{rank}.txt").write_text(traceback.format_exc())
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip the parent's (pytest's) exit handlers


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:] or None)
