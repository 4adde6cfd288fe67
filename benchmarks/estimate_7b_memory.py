"""Training memory per GPU for a 7B model under DDP (and on one GPU with compact gradients), scaled from bytes per
parameter measured on SmolLM2-135M.

Method. SmolLM2-135M-Instruct is loaded in each weight dtype; one forward/backward of the real loss on a short batch
allocates the gradients (with sparse_rl's masking hooks for the sparse rows), and one optimizer step allocates the
optimizer state. Every tensor is counted by ``numel * element_size``: weights over the model's unique parameters,
gradients over ``p.grad``, state as ``torch.optim.AdamW``'s state tensors or ``MaskedAdamW.state_bytes()`` (moments,
8-bit absmax, fp32 master copies, selection layout). Dividing by the parameter count gives bytes per parameter; the
7B column multiplies them by 7.0e9. The scaling is linear because every term is per entry (a weight, a gradient,
state per selected entry, 1 bit + tile offsets per entry of the layout) at the same per-tensor density.

Under DDP every GPU holds a full replica, so the 7B column is memory per GPU. The reference model (DPO, or
GRPO/RLOO with beta > 0) is a column of its own: TRL's copy is the weights again; ``shared_reference=True`` keeps the
selected entries' starting values plus their int32 indices (``SharedReference.extra_bytes()``), the indices being the
compact gradient hooks' own with compact gradients (then only ``value_bytes()`` is extra). With
``sparse_rl.trl.build_trainer`` the copy is never built, so it does not set a construction peak either. Not included
(the same for the rows of a dtype): activations (they depend on batch and sequence length), DDP's gradient buckets
(one more gradient-sized buffer unless ``gradient_as_bucket_view=True``), the CUDA context, and the
``SubnetworkMask`` (packed, 1 bit per entry, kept in host memory, not on the GPU: its own column).

    python benchmarks/estimate_7b_memory.py     # writes benchmarks/results/estimate_7b_memory.md
"""

from __future__ import annotations

import argparse

import torch
from _common import RESULTS_DIR, write_result

from sparse_rl import MaskedAdamW
from sparse_rl.discovery import random_mask
from sparse_rl.models import load_smollm2
from sparse_rl.reference import SharedReference
from sparse_rl.restrict import restrict_gradients
from sparse_rl.restrict.compact import gradients as gradients_of

RESULTS = RESULTS_DIR / "estimate_7b_memory.md"
PARAMETERS_7B = 7.0e9
GIB = 1024**3


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(dtype: torch.dtype, density: float | None, state_bits: int = 32, compact: bool = False) -> dict:
    """Bytes per parameter of weights, gradients, what the gradient hooks hold and optimizer state after one training
    step (gradients counted before the step, which consumes compact ones); ``density=None`` is full finetuning with
    ``torch.optim.AdamW``."""
    model, tokenizer = load_smollm2(dtype=dtype)
    model.train()
    num_parameters = sum(p.numel() for p in model.parameters())
    hook_bytes = mask_bytes = 0
    if density is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        reference = tensor_bytes(model.parameters())  # TRL's copy
    else:
        mask = random_mask(model, density)
        mask_bytes = mask.nbytes
        restriction = restrict_gradients(model, mask, compact=compact)
        # what the CUDA path holds (the estimate is for a GPU): compact hooks keep the int32 positions of every
        # partly selected tensor, which the shared reference indexes with too; on CPU both read the mask's bits
        partial = [n for n, p in model.named_parameters() if 0 < mask.count(n) < p.numel()]
        positions = 4 * sum(mask.count(n) for n in partial)
        hook_bytes = restriction.dense_bytes + (positions if compact else 0)
        if density >= 1.0:  # full finetuning measured as MaskedAdamW: TRL keeps its copy
            reference = tensor_bytes(model.parameters())
        else:  # built after the hooks: with compact gradients it shares their positions
            shared = SharedReference(model, mask)
            reference = shared.value_bytes() + (0 if compact else 4 * mask.num_selected)
        optimizer = MaskedAdamW(model.named_parameters(), mask, lr=1e-6, state_bits=state_bits)
    batch = tokenizer(["What is 12 + 7? The answer is 19."] * 2, return_tensors="pt")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    gradients = tensor_bytes(gradients_of(model.parameters()))
    optimizer.step()
    if density is None:
        state = tensor_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    else:
        state = optimizer.state_bytes()
    measured = {
        "weights": tensor_bytes(model.parameters()),
        "gradients": gradients,
        "hooks": hook_bytes,
        "state": state,
        "reference": reference,
        "mask": mask_bytes,
    }
    return {"num_parameters": num_parameters, **{k: v / num_parameters for k, v in measured.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    d = args.density
    # (weights, optimizer, dtype, density, state_bits, compact); the first row of each dtype is the reference of its
    # ratios. compact_grads rows are for a single GPU (compact gradients are single-process: DDP reduces dense ones).
    # Full finetuning of bf16 weights at the precision sparse_rl keeps (fp32 moments and master copy) is measured
    # as MaskedAdamW at density 1; torch's AdamW on bf16 weights keeps bf16 moments and no master copy.
    setups = [
        ("fp32 (Trainer bf16 autocast)", "full AdamW (torch)", torch.float32, None, 32, False),
        ("fp32 (Trainer bf16 autocast)", f"sparse_rl d={d}", torch.float32, d, 32, False),
        ("fp32 (Trainer bf16 autocast)", f"sparse_rl d={d}, 8-bit moments", torch.float32, d, 8, False),
        ("fp32 (Trainer bf16 autocast)", f"sparse_rl d={d}, compact grads (1 GPU)", torch.float32, d, 32, True),
        ("bf16", "full AdamW, fp32 moments + master (MaskedAdamW d=1)", torch.bfloat16, 1.0, 32, False),
        ("bf16", "full AdamW (torch: bf16 moments, no master)", torch.bfloat16, None, 32, False),
        ("bf16", f"sparse_rl d={d} (fp32 moments + master)", torch.bfloat16, d, 32, False),
        ("bf16", f"sparse_rl d={d}, 8-bit moments + fp32 master", torch.bfloat16, d, 8, False),
        ("bf16", f"sparse_rl d={d}, compact grads (1 GPU)", torch.bfloat16, d, 32, True),
        ("bf16", f"sparse_rl d={d}, 8-bit moments, compact grads (1 GPU)", torch.bfloat16, d, 8, True),
    ]
    rows, reference_total = [], {}
    for weights, optimizer, dtype, density, state_bits, compact in setups:
        result = measure(dtype, density, state_bits, compact)
        total = result["weights"] + result["gradients"] + result["hooks"] + result["state"]
        with_reference = total + result["reference"]
        reference_total.setdefault(weights, (total, with_reference))
        rows.append((weights, optimizer, result, total, total / reference_total[weights][0], with_reference,
                     with_reference / reference_total[weights][1]))
        print(weights, optimizer, {k: round(v, 4) for k, v in result.items()}, flush=True)

    num_parameters = rows[0][2]["num_parameters"]
    lines = [
        "# Training memory per GPU for a 7B model under DDP (estimate from measured bytes per parameter)",
        "",
        f"Bytes per parameter measured on SmolLM2-135M-Instruct ({num_parameters:,} parameters) after one "
        "forward/backward and one optimizer step, counting every weight, gradient and optimizer-state tensor "
        "(`numel * element_size`; `MaskedAdamW.state_bytes()` for sparse_rl), then multiplied by 7.0e9 "
        f"parameters. Random per-tensor mask at density {d} over all parameters. Under DDP every GPU holds all of "
        "it. *reference*: TRL's copy for full finetuning, the shared reference for sparse_rl (starting values of the "
        "selected entries, plus their int32 indices unless the compact gradient hooks already hold them); the last "
        "two columns add it (DPO, KL-regularised GRPO/RLOO). Not included, the same for the rows of one dtype: "
        "activations, DDP's gradient buckets, the CUDA context. *mask (host)*: the `SubnetworkMask` sparse_rl keeps in "
        "host memory (packed, 1 bit per entry), not on the GPU.",
        "",
        "| weights | optimizer | weights B/param | grads B/param | gradient hooks B/param | optimizer state B/param "
        "| total B/param | 7B per GPU (GiB) | vs first row of the dtype | reference B/param | 7B with reference "
        "(GiB) | vs first row | mask (host) B/param |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for weights, optimizer, result, total, ratio, with_reference, ratio_reference in rows:
        lines.append(f"| {weights} | {optimizer} | {result['weights']:.2f} | {result['gradients']:.2f} | "
                     f"{result['hooks']:.2f} | {result['state']:.3f} | {total:.2f} | "
                     f"{total * PARAMETERS_7B / GIB:.1f} | {ratio:.2f} | {result['reference']:.2f} | "
                     f"{with_reference * PARAMETERS_7B / GIB:.1f} | {ratio_reference:.2f} | "
                     f"{result['mask']:.3f} |")
    lines += [
        "",
        "Without compact gradients, gradients stay dense: the hooks zero unselected entries of a full-size `.grad` "
        "and keep a bool per entry to do it. With `compact_grads=True` (one process) a gradient holds its selected "
        "entries only and the hooks keep their int32 flat indices; one parameter's dense gradient is alive at a "
        "time during backward (not counted above; the largest is the embedding matrix's: 57 MB in bf16 for SmolLM2, "
        "0.26 GB for a 7B Llama's 131M-entry embedding). A tied embedding and output head gets two gradients: "
        "the lookup's is compact (its rows only), and so is the output head's in TRL's fused LM head on CPU (computed "
        "in 4 MiB blocks of vocabulary rows); elsewhere (GPU, or a head TRL does not fuse) the head's is dense and "
        "lives through the backward (TRL accumulates it in fp32: 108 MiB for SmolLM2-135M, 0.5 GB for a 131M-entry "
        "head), as in full finetuning.",
        "",
        "Reproduce: `python benchmarks/estimate_7b_memory.py`",
        "",
    ]
    write_result("\n".join(lines), RESULTS, write=not args.no_write)


if __name__ == "__main__":
    main()
