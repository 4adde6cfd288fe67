"""Runs sparse training on an FSDP2 (``fully_shard``) model for tests/test_fsdp.py.

Launched as ``torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT CHECKPOINT`` (gloo on CPU). Each rank writes
``OUT/<scenario>-rank<r>.pt`` with what it saw; the test compares ranks with each other and with
:func:`train_loop` run in one process without FSDP on the whole batch. Scenarios run in one launch so the imports are
paid once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch.distributed as dist  # noqa: E402

from sparse_rl import MaskedAdamW, SubnetworkMask  # noqa: E402
from sparse_rl.discovery import random_mask  # noqa: E402
from sparse_rl.optim import unwrap_optimizer  # noqa: E402
from sparse_rl.restrict import restrict_gradients  # noqa: E402
from sparse_rl.restrict.sharded import local_tensor, shard_mask  # noqa: E402
from tests.tiny import make_tiny_model  # noqa: E402

STEPS = 3
BATCH, LENGTH = 4, 8  # the global batch; each of W processes takes BATCH // W rows
LR, WEIGHT_DECAY, MAX_NORM = 1e-2, 0.1, 0.05  # MAX_NORM is small enough that clipping scales every step
SFT_BATCH = 4
FROZEN = "model.layers.0.self_attn.k_proj.weight"  # an empty selection: requires_grad=False
FULL = "model.norm.weight"  # a full selection: no hook at all


def make_model() -> torch.nn.Module:
    """The tiny Llama with a vocabulary of 31 rows, so the embedding and LM head shard unevenly (16 + 15 rows)."""
    return make_tiny_model(seed=0, vocab_size=31)


def make_mask(model: torch.nn.Module) -> SubnetworkMask:
    """The same mask on every rank (a seeded random mask), with one empty and one full tensor."""
    mask = random_mask(model, 0.2, seed=1)
    selections = dict(mask.items())
    selections[FROZEN] = torch.zeros_like(selections[FROZEN])
    selections[FULL] = torch.ones_like(selections[FULL])
    return SubnetworkMask(selections)


def global_batch() -> torch.Tensor:
    return torch.randint(4, 20, (BATCH, LENGTH), generator=torch.Generator().manual_seed(7))


def train_loop(model: torch.nn.Module, mask: SubnetworkMask, input_ids: torch.Tensor, on_backward=None) -> dict:
    """The user's own loop: masked gradients, clipping, MaskedAdamW; the same code with and without FSDP2."""
    restrict_gradients(model, mask)
    optimizer = MaskedAdamW(model.named_parameters(), mask, lr=LR, weight_decay=WEIGHT_DECAY)
    grad_norms = []
    for _ in range(STEPS):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        if on_backward is not None:
            on_backward(model)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        grad_norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        optimizer.step()
        optimizer.zero_grad()
    return {"optimizer": optimizer, "grad_norms": grad_norms}


def fully_shard_scenario(out: Path) -> None:
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    mask = make_mask(model)
    for layer in model.model.layers:  # what accelerate's transformer-layer auto wrap does
        fully_shard(layer)
    fully_shard(model)
    local_masks = shard_mask(model, mask)
    local_initial = {n: local_tensor(p).detach().clone() for n, p in model.named_parameters()}
    leaks = []  # per step: local gradient entries outside the local mask that are not zero

    def check_gradients(model):
        for name, param in model.named_parameters():
            if param.grad is not None:
                leaks.append(int(local_tensor(param.grad)[~local_masks[name]].count_nonzero()))

    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    run = train_loop(model, mask, global_batch()[rows], on_backward=check_gradients)
    optimizer = run["optimizer"]
    state_dict = optimizer.state_dict()
    reloaded = MaskedAdamW(model.named_parameters(), mask, lr=LR, weight_decay=WEIGHT_DECAY)
    reloaded.load_state_dict(torch.load(_save(state_dict, out / f"optimizer-rank{rank}.pt"), weights_only=False))
    params = dict(model.named_parameters())
    torch.save({
        "mask": mask,
        "local_masks": local_masks,
        "local_initial": local_initial,
        "local_final": {n: local_tensor(p).detach().clone() for n, p in params.items()},
        "full_final": {n: p.full_tensor().detach().clone() for n, p in params.items()},  # collective
        "placements": {n: [str(pl) for pl in p.placements] for n, p in params.items()},
        "requires_grad": {n: p.requires_grad for n, p in params.items()},
        "grad_leaks": leaks,
        "grad_norms": run["grad_norms"],
        "local_selected": {optimizer._names[p]: optimizer.state[p]["exp_avg"].numel() for p in optimizer.state},
        "state": {optimizer._names[p]: dict(s) for p, s in optimizer.state.items()},
        "reloaded_state": {reloaded._names[p]: dict(s) for p, s in reloaded.state.items()},
    }, out / f"fully_shard-rank{rank}.pt")


def bf16_scenario(out: Path) -> None:
    """bf16 weights: MaskedAdamW keeps an fp32 master copy of each rank's local selected entries."""
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model().to(torch.bfloat16)
    mask = make_mask(model)
    fully_shard(model)
    local_masks = shard_mask(model, mask)
    local_initial = {n: local_tensor(p).detach().clone() for n, p in model.named_parameters()}
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    optimizer = train_loop(model, mask, global_batch()[rows])["optimizer"]
    torch.save({
        "local_masks": local_masks,
        "local_initial": local_initial,
        "local_final": {n: local_tensor(p).detach().clone() for n, p in model.named_parameters()},
        "master": {optimizer._names[p]: s["master"].clone() for p, s in optimizer.state.items()},
    }, out / f"bf16-rank{rank}.pt")


def force_fsdp2(trainer) -> None:
    """Put the trainer's accelerator in the FSDP2 state it has on GPUs.

    accelerate enables FSDP only for accelerator back-ends (``AcceleratorState``: MULTI_GPU, MULTI_XPU, ...); on
    CPU it ignores the plugin and runs plain multi-CPU data parallel. With the state set, ``Trainer.train`` takes its
    FSDP2 path on gloo: ``accelerator.prepare(model, optimizer)`` runs ``fully_shard`` and swaps the optimizer's
    params for the DTensor shards, clipping goes through DTensor gradients.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    trainer.is_fsdp_enabled = True


def sft_trainer(checkpoint: Path, output_dir: Path, world_size: int, fsdp: bool):
    """SFT on the tiny model, ``SFT_BATCH`` sequences per optimizer step taken in order. With FSDP they come as 2
    micro-batches per process (gradient accumulation: FSDP2 reduce-scatters only after the last one); without, as
    one batch."""
    from tests.trl_cases import build_trainer

    if fsdp:
        extra = dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
                     per_device_train_batch_size=SFT_BATCH // world_size // 2, gradient_accumulation_steps=2)
    else:
        extra = dict(per_device_train_batch_size=SFT_BATCH // world_size)
    return build_trainer("sft", checkpoint, output_dir, max_steps=STEPS, train_sampling_strategy="sequential",
                         max_grad_norm=MAX_NORM, **extra)


def sparsify_sft(trainer):
    from sparse_rl import SparseConfig, sparsify

    return sparsify(trainer, SparseConfig(discovery="random", density=0.2, seed=3, compact_grads=False))


def trainer_scenario(out: Path, checkpoint: Path) -> None:
    from tests.trl_cases import snapshot

    rank, world = dist.get_rank(), dist.get_world_size()
    trainer = sft_trainer(checkpoint, out / "sft", world, fsdp=True)
    force_fsdp2(trainer)
    initial = snapshot(trainer.model)
    sparse = sparsify_sft(trainer)
    trainer.train()
    optimizer = unwrap_optimizer(trainer.optimizer)
    params = dict(trainer.model.named_parameters())
    torch.save({
        "mask": sparse.mask,
        "initial": initial,
        "full_final": {n: p.full_tensor().detach().clone() for n, p in params.items()},  # collective
        "placements": {n: [str(pl) for pl in p.placements] for n, p in params.items()},
        "optimizer_params_sharded": all(type(p).__name__ == "DTensor"
                                        for g in optimizer.param_groups for p in g["params"]),
        "grad_norms": [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log],
        "local_selected": {optimizer._names[p]: optimizer.state[p]["exp_avg"].numel() for p in optimizer.state},
    }, out / f"trainer-rank{rank}.pt")


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # two processes share two cores
    dist.init_process_group("gloo")
    try:
        fully_shard_scenario(out)
        bf16_scenario(out)
        trainer_scenario(out, Path(sys.argv[2]))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
