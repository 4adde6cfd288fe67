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
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402

from sparse_rl import SparseConfig, sparsify  # noqa: E402
from sparse_rl.discovery import (  # noqa: E402
    BUDGETS,
    PROBE_SCORES,
    ProbeOptions,
    accumulate_gradient_scores,
    gradient_mask,
)
from sparse_rl.discovery import probe as probe_module  # noqa: E402
from sparse_rl.distributed import MaskMismatchError, average_gradients, check_masks_agree  # noqa: E402
from sparse_rl.mask import SubnetworkMask  # noqa: E402
from sparse_rl.restrict.tokens import select_high_entropy_tokens  # noqa: E402
from tests.trl_cases import build_trainer, snapshot  # noqa: E402

DPO_STEPS = 3
GLOBAL_BATCH = 4  # preference pairs per optimizer step, summed over processes
# A random mask and the global entropy threshold: the result depends on the all-reduce, the batch split and the gather.
# At q = 0.2 the ranks' shares of the globally kept tokens differ from 20% each, so a rank-local threshold would keep
# other tokens (at q = 0.5 this batch happens to split evenly and could not tell).
# dense masked gradients in both runs (the one-process run would default to compact ones): the comparison reads .grad
DPO_CONFIG = SparseConfig(discovery="random", density=0.3, entropy_quantile=0.2, compact_grads=False)
ENTROPY_QUANTILE = 0.3
# The probe on fixed token batches: every rank takes PROBE_ROWS rows of each step's global batch.
PROBE_STEPS = 3
PROBE_ROWS = 3
PROBE_DENSITY = 0.2
GRPO_PROBE = SparseConfig(density=0.2, probe=ProbeOptions(steps=2))


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
    collective, so all ranks probe together). Records each probe step's gradients as the rank's backward left them,
    before :func:`average_gradients`, and whether the model the probe ran was wrapped in DDP (before ``train()``)."""
    local_gradients, probed_models = [], []

    def recording_average(params):
        probed_models.append(isinstance(trainer.model_wrapped, DistributedDataParallel))
        local_gradients.append({n: p.grad.detach().clone() for n, p in params if p.grad is not None})
        yield from average_gradients(params)

    trainer = build_trainer("grpo", checkpoint, output_dir, max_steps=1, per_device_train_batch_size=4)
    initial = snapshot(trainer.model)
    probe_module.average_gradients = recording_average
    try:
        sparse = sparsify(trainer, GRPO_PROBE)
    finally:
        probe_module.average_gradients = average_gradients
    trainer.train()
    return {"initial": initial, "local_gradients": local_gradients, "probed_ddp": probed_models,
            "trained_ddp": isinstance(trainer.model_wrapped, DistributedDataParallel), "mask": sparse.mask,
            "final": snapshot(trainer.model)}


def probe_shard(rank: int) -> slice:
    return slice(rank * PROBE_ROWS, (rank + 1) * PROBE_ROWS)


def probe_loss(model, rows: slice):
    """``loss_fn(step)``: the language-model loss on ``rows`` of step ``step``'s global batch. Every row has the
    same length and no padding, so the global batch's loss is the mean of the shards' losses."""
    def loss_fn(step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1000 + step)
        ids = torch.randint(4, model.config.vocab_size, (2 * PROBE_ROWS, 10), generator=generator)[rows]
        return model(input_ids=ids, labels=ids).loss

    return loss_fn


def run_probe(checkpoint, rank: int) -> dict:
    """Every score kind and budget of the probe, each rank on its own rows of the same global batches."""
    if not dist.is_initialized():  # no trainer here to initialise the process group from the launcher's environment
        dist.init_process_group("gloo")
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    loss_fn = probe_loss(model, probe_shard(rank))
    scores = {kind: accumulate_gradient_scores(model, loss_fn, ProbeOptions(steps=PROBE_STEPS, score=kind))
              for kind in PROBE_SCORES}
    masks = {(kind, budget): gradient_mask(model, loss_fn, PROBE_DENSITY,
                                           ProbeOptions(steps=PROBE_STEPS, score=kind, budget=budget))
             for kind in PROBE_SCORES for budget in BUDGETS}
    return {"scores": scores, "masks": masks}


def entropy_shard(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s per-token entropies; ranks hold different numbers of rows and of valid tokens."""
    generator = torch.Generator().manual_seed(100 + rank)
    entropy = torch.rand(3 + rank, 7, generator=generator) * 4
    valid = torch.rand(3 + rank, 7, generator=generator) < 0.8
    return entropy, valid


def partial_model() -> torch.nn.ModuleDict:
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"a": torch.nn.Linear(3, 2), "b": torch.nn.Linear(3, 2)})


PARTIAL_USES_B = {(0, 1), (2, 0), (2, 1)}  # (step, rank) whose loss uses "b": one rank, none, both


def partial_loss(model: torch.nn.ModuleDict, rank: int, step: int) -> torch.Tensor:
    """Rank ``rank``'s probe loss at ``step``; "b" is outside some ranks' graphs (it gets no gradient there)."""
    x = torch.arange(6.0).reshape(2, 3) + rank - step
    loss = model["a"](x).square().mean()
    return loss + model["b"](x).sum() if (step, rank) in PARTIAL_USES_B else loss


def run_collectives(rank: int) -> dict:
    """The entropy threshold over all processes' tokens, a probe where a parameter gets no gradient on some ranks,
    and the errors of mismatched masks and parameters (raised on every rank)."""
    entropy, valid = entropy_shard(rank)
    selection = select_high_entropy_tokens(entropy, valid, quantile=ENTROPY_QUANTILE)
    result = {"keep": selection.keep, "threshold": selection.threshold, "num_kept": selection.num_kept,
              "num_valid": selection.num_valid}
    model = partial_model()
    result["partial_scores"] = accumulate_gradient_scores(model, lambda step: partial_loss(model, rank, step),
                                                          ProbeOptions(steps=3, score="adam"))
    base = {"a": torch.tensor([True, False, True]), "b": torch.zeros(2, 2, dtype=torch.bool)}
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 1), **({"c": torch.nn.Linear(1, 1)} if rank == 1 else {})})
    for name, call in {
        "probe_structure": lambda: accumulate_gradient_scores(model, lambda step: model["a"].weight.sum(),
                                                              ProbeOptions(steps=1)),
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
    "probe": lambda checkpoint, out, rank: run_probe(checkpoint, rank),
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
