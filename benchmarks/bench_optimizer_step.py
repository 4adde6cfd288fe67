"""Optimizer step on SmolLM2-135M's parameter shapes: MaskedAdamW (CPU path) against dense AdamW, side by side.

For densities 1, 5, 10, 30 and 100% (uniformly random masks, the worst case for memory locality) it measures in one
run, interleaving the providers round by round so that machine noise hits them alike:

* step time of MaskedAdamW (fp32 state and 8-bit state) and of torch.optim.AdamW fused / foreach and bitsandbytes
  AdamW8bit on the same tensors, as medians over the rounds, and their ratio to the fused step;
* optimizer-state bytes of each (MaskedAdamW: ``state_bytes()``, layout included);
* the CPU path's effective bandwidth (cache lines it must touch / step time) against a copy bandwidth measured in the
  same run, and the time of a loop that does nothing but touch those lines (read the selected grads, read and write
  the selected params): a floor for any kernel reading the dense grad and param tensors at that density;
* the Triton kernel's bytes per step counted from its loads and stores at 32-byte-sector granularity (what DRAM
  moves on a GPU), against the minimum for its layout (only the selected values, plus bitmask and offsets).

Random tensors of the model's shapes stand in for the weights (the config is read from the converted cache when
present, else SmolLM2-135M's published values are used). Run:

    TRITON_INTERPRET=1 .venv/bin/python benchmarks/bench_optimizer_step.py [--quick] [--threads 1 2] [--rounds N]

Every provider runs on the same number of threads (``torch.set_num_threads``; MaskedAdamW's numba path follows
torch's count), once per value of ``--threads``. Step times are medians of wall time; the CPU time column (process
CPU time, all threads) is less sensitive to other processes taking the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch
from _common import write_csv
from numba import carray, njit, prange
from sparse_rl.kernels.cpu_common import as_pointer
from sparse_rl.kernels.layout import TILE
from sparse_rl.kernels.masked_adamw_cpu_blocks import block_path_available

from sparse_rl import MaskedAdamW, SubnetworkMask

RESULTS = Path(__file__).parent / "results"
DENSITIES = (0.01, 0.05, 0.10, 0.30, 1.0)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def model_shapes(quick: bool) -> dict[str, tuple[int, ...]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparse_rl.models import default_cache_dir

    config_file = default_cache_dir() / "config.json"
    values = dict(SMOLLM2_135M)
    if config_file.exists():
        saved = json.loads(config_file.read_text())
        values.update({k: saved[k] for k in SMOLLM2_135M if k in saved})
    if quick:  # a few layers and a smaller vocabulary: the same shapes per layer, ~15x fewer parameters
        values.update(num_hidden_layers=2, vocab_size=8192)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**values))
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def state_bytes_of(optimizer: torch.optim.Optimizer) -> int:
    if isinstance(optimizer, MaskedAdamW):
        return optimizer.state_bytes()
    total = 0
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for k, v in state.items() if torch.is_tensor(v) and k != "step")
    return total


def copy_bandwidth(numel: int = 64 * 2**20, rounds: int = 5) -> float:
    """GB/s of ``dst.copy_(src)`` on fp32 buffers (read + write counted), the same yardstick as the step."""
    src, dst = torch.randn(numel), torch.empty(numel)
    dst.copy_(src)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * numel * 4 / min(times) / 1e9


def lines_touched(selection: np.ndarray, element_bytes: int, line_bytes: int) -> int:
    """Number of ``line_bytes`` lines of a tensor that hold at least one selected entry."""
    per_line = line_bytes // element_bytes
    padded = np.zeros(-(-selection.size // per_line) * per_line, dtype=bool)
    padded[: selection.size] = selection
    return int(padded.reshape(-1, per_line).any(axis=1).sum())


def gradient_bytes(params: dict[str, torch.nn.Parameter], mask: SubnetworkMask | None, compact: bool) -> int:
    """Bytes the gradients take while the optimizer runs: dense fp32 ``.grad`` (plus the dense hook's 1-byte bool mask
    under a mask), or compact gradients plus the compact hook's int32 indices (4 + 4 bytes per selected entry)."""
    if mask is None or mask.num_selected == mask.num_total:
        return sum(p.numel() * 4 for p in params.values())
    if compact:
        return 8 * mask.num_selected
    return sum(p.numel() * 5 for p in params.values())


def traffic(mask: SubnetworkMask, state_bits: int, line_bytes: int, compact_grads: bool = False) -> tuple[float, float]:
    """(bytes one step must move at ``line_bytes`` granularity, minimum bytes for the layout), fp32 params.

    Touched lines of grad (read; with compact gradients only the selected values, contiguous) and param (read +
    write); compact state read and written in full; bitmask and tile offsets read (8-bit: block offsets and absmax
    too). The minimum moves only the selected values themselves.
    """
    state_per_entry = 2 * (2 if state_bits == 8 else 8)  # read + write of exp_avg and exp_avg_sq
    counted = minimum = 0.0
    for selection in mask.selections.values():
        flat = selection.reshape(-1).numpy()
        k, n = int(flat.sum()), flat.size
        if k == 0:
            continue
        tiles = -(-n // TILE)
        layout_bytes = tiles * (TILE // 8 + 4) + (tiles * 4 + 2 * 2 * 4 * -(-k // 256) if state_bits == 8 else 0)
        grad_lines = 0 if compact_grads else 1
        counted += ((2 + grad_lines) * lines_touched(flat, 4, line_bytes) * line_bytes + k * state_per_entry
                    + layout_bytes + (4 * k if compact_grads else 0))
        minimum += k * (4 + 8) + k * state_per_entry + layout_bytes
    return counted, minimum


def time_rounds(providers: dict[str, callable], rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process CPU time of each provider's step, interleaved round by round after one warm-up round."""
    wall = {name: [] for name in providers}
    cpu = {name: [] for name in providers}
    for step in providers.values():  # warm-up: state allocation, numba/bitsandbytes first calls
        step()
    for _ in range(rounds):
        for name, step in providers.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


@njit(error_model="numpy")  # not inlined: numba 0.68 drops stores through these raw views inlined into a prange
def _touch_range(param_bases, grad_bases, tensor_of, index_of, compact_grad, compact, first, last):
    """Read the selected grads (dense, or the contiguous compact ones) and read-modify-write the selected params:
    the memory traffic of a masked step, with no decoding, no state and no arithmetic to speak of. Entries of all
    tensors in one list ((tensor, flat index) pairs, 8 bytes an entry), so that threads share them evenly."""
    for k in range(first, last):
        tensor = tensor_of[k]
        param = carray(as_pointer(param_bases[tensor]), 1 << 31, np.float32)
        i = np.int64(index_of[k])
        if compact:
            g = compact_grad[k]
        else:
            g = carray(as_pointer(grad_bases[tensor]), 1 << 31, np.float32)[i]
        param[i] = param[i] + g * np.float32(0.0)


@njit(error_model="numpy")
def _touch_serial(param_bases, grad_bases, tensor_of, index_of, compact_grad, compact):
    _touch_range(param_bases, grad_bases, tensor_of, index_of, compact_grad, compact, 0, index_of.size)


@njit(parallel=True, error_model="numpy")
def _touch_parallel(param_bases, grad_bases, tensor_of, index_of, compact_grad, compact):
    chunk = 1 << 14
    for c in prange((index_of.size + chunk - 1) // chunk):
        _touch_range(param_bases, grad_bases, tensor_of, index_of, compact_grad, compact, c * chunk,
                     min((c + 1) * chunk, index_of.size))


def touch_step(params: dict[str, torch.nn.Parameter], mask: SubnetworkMask, compact: bool = False) -> callable:
    """A step of the touch-only loop over ``mask``'s entries (see :func:`_touch_range`), on torch's thread count."""
    names = list(params)
    indices = [np.flatnonzero(mask[n].reshape(-1).numpy()).astype(np.int32) for n in names]
    tensor_of = np.concatenate([np.full(ix.size, t, np.int32) for t, ix in enumerate(indices)])
    index_of = np.concatenate(indices)
    param_bases = np.array([params[n].data_ptr() for n in names], np.int64)
    grad_bases = np.array([params[n].grad.data_ptr() for n in names], np.int64)
    compact_grad = np.concatenate([params[n].grad.view(-1).numpy()[ix] for n, ix in zip(names, indices)])

    def step():
        threads = torch.get_num_threads()
        if threads > 1:
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            _touch_parallel(param_bases, grad_bases, tensor_of, index_of, compact_grad, compact)
        else:
            _touch_serial(param_bases, grad_bases, tensor_of, index_of, compact_grad, compact)
        torch.set_num_threads(threads)  # numba's pool start sets the OpenMP thread count: keep torch's

    step.grads = [params[n].grad for n in names]  # keeps the tensors at grad_bases alive
    return step


def compact_step(optimizer: MaskedAdamW, params: dict[str, torch.nn.Parameter], mask: SubnetworkMask) -> callable:
    """A MaskedAdamW step reading compact gradients (``SparseConfig(compact_grads=True)``): the selected gradient
    entries, as the compact-gradient hook leaves them, with no dense ``.grad`` (restored after the step for the other
    providers, which share the parameters)."""
    compact = {n: p.grad[mask[n]].clone() for n, p in params.items()}

    def step():
        for n, p in params.items():
            p.compact_grad, p.grad = compact[n], None
        try:
            optimizer.step()
        finally:  # the step consumed the compact gradients of stepped tensors; drop those of empty selections too
            for n, p in params.items():
                p.compact_grad, p.grad = None, dense_grads[n]

    dense_grads = {n: p.grad for n, p in params.items()}
    return step


def general_path(step: callable) -> callable:
    """``step`` with the CPU block path turned off (``SPARSE_RL_CPU_BLOCKS=0``): the general per-entry path that
    bf16/fp16 parameters and 8-bit state take, timed on the same fp32 tensors for comparison."""

    def run():
        previous = os.environ.get("SPARSE_RL_CPU_BLOCKS")
        os.environ["SPARSE_RL_CPU_BLOCKS"] = "0"
        try:
            step()
        finally:
            if previous is None:
                del os.environ["SPARSE_RL_CPU_BLOCKS"]
            else:
                os.environ["SPARSE_RL_CPU_BLOCKS"] = previous

    return run


def restriction_steps(params: dict[str, torch.nn.Parameter], mask: SubnetworkMask, label: str) -> dict:
    """What each gradient restriction costs per backward, on the same gradients: the dense hook's ``torch.where`` (a
    new zero-filled gradient) against the compact hook's ``index_select`` of the selected entries."""
    from sparse_rl.restrict.compact import selected_indices

    keep = {n: mask[n] for n in params}
    indices = {n: selected_indices(mask[n], "cpu") for n in params}
    zero = torch.zeros(())

    def dense_hook():
        for n, p in params.items():
            torch.where(keep[n], p.grad, zero)

    def compact_hook():
        for n, p in params.items():
            torch.index_select(p.grad.reshape(-1), 0, indices[n])

    return {f"dense-gradient hook {label}": dense_hook, f"compact-gradient hook {label}": compact_hook}


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2-layer model with an 8K vocabulary, 2 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per provider (default 5, quick 2)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch thread counts to run every provider at (default: torch's current count)")
    parser.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES),
                        help="mask densities to run (default 0.01 0.05 0.1 0.3 1; each costs memory)")
    parser.add_argument("--state-bits", type=int, nargs="+", default=[32, 8], choices=[32, 8],
                        help="MaskedAdamW state precisions to run")
    parser.add_argument("--mask", nargs="+", default=[],
                        help="also run saved SubnetworkMasks over SmolLM2-135M's parameters (e.g. "
                        "outputs/demo/final/sparse_mask.safetensors, the demo's probe mask, after `make demo`, or "
                        "one saved by benchmarks/probe_mask.py)")
    parser.add_argument("--fused-only", action="store_true",
                        help="leave out the foreach and bitsandbytes baselines (1.3 GB of state less)")
    args = parser.parse_args()
    if args.mask and args.quick:
        parser.error("--mask needs the full model's shapes; leave out --quick")
    rounds = args.rounds or (2 if args.quick else 5)
    densities = sorted(args.densities)
    if 0.01 not in densities or 0.1 not in densities:
        raise SystemExit("--densities must include 0.01 and 0.1 (the targets are read at those densities)")
    thread_counts = args.threads or [torch.get_num_threads()]
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    shapes = model_shapes(args.quick)
    params = {n: torch.nn.Parameter(torch.randn(s, generator=generator) * 0.02) for n, s in shapes.items()}
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    total = sum(p.numel() for p in params.values())
    print(f"{len(params)} tensors, {total / 1e6:.1f}M fp32 parameters, torch {torch.__version__}, numba "
          f"{numba.__version__} ({numba.config.NUMBA_NUM_THREADS} threads at most), thread counts {thread_counts}, "
          f"CPU block path {'on' if block_path_available() else 'off (no AVX-512)'}, "
          f"{platform.processor() or platform.machine()}, load average {load_average()}")

    optimizers: dict[str, torch.optim.Optimizer] = {
        "torch AdamW fused": torch.optim.AdamW(params.values(), fused=True, **HYPER),
    }
    if not args.fused_only:
        optimizers["torch AdamW foreach"] = torch.optim.AdamW(params.values(), foreach=True, **HYPER)
        try:
            import bitsandbytes as bnb

            optimizers["bnb AdamW8bit"] = bnb.optim.AdamW8bit(params.values(), **HYPER)
        except Exception as error:  # noqa: BLE001 - report and go on without the baseline
            print(f"bitsandbytes AdamW8bit unavailable: {error}")
    masks = {f"d={d:.0%}": SubnetworkMask({n: torch.rand(s, generator=generator) < d for n, s in shapes.items()})
             for d in densities}
    for path in args.mask:  # saved masks (e.g. the demo's probe mask): real masks have locality random ones lack
        saved = SubnetworkMask.load(path)
        masks[f"{Path(path).stem} {saved.num_selected / saved.num_total:.1%}"] = SubnetworkMask(
            {n: saved[n] for n in shapes})
    compact = {}
    general_steps = set()  # providers timed on the general path
    row_mask = {}  # provider -> the mask key its row is about
    for key, mask in masks.items():
        for bits in args.state_bits:
            label = f"MaskedAdamW {key}" + (" 8-bit" if bits == 8 else "")
            optimizers[label] = MaskedAdamW(params.items(), mask, state_bits=bits, backend="cpu", **HYPER)
            row_mask[label] = key
        if mask.num_selected < mask.num_total:
            label = f"MaskedAdamW {key} compact grads"
            optimizers[label] = MaskedAdamW(params.items(), mask, backend="cpu", **HYPER)
            compact[label] = compact_step(optimizers[label], params, mask)
            row_mask[label] = key
    if block_path_available():  # the same fp32 steps on the general path, for comparison in the same run
        for label in [name for name in optimizers if name.startswith("MaskedAdamW") and "8-bit" not in name]:
            general = label + " general path"
            optimizers[general] = MaskedAdamW(params.items(), masks[row_mask[label]], backend="cpu", **HYPER)
            if label in compact:
                compact[general] = compact_step(optimizers[general], params, masks[row_mask[label]])
            row_mask[general] = row_mask[label]
            general_steps.add(general)
    steps = {name: compact.get(name, opt.step) for name, opt in optimizers.items()}
    steps = {name: general_path(step) if name in general_steps else step for name, step in steps.items()}
    for key, mask in masks.items():
        if mask.num_selected < mask.num_total:
            for suffix, is_compact in (("", False), (" compact grads", True)):
                steps[f"touch-only loop {key}{suffix}"] = touch_step(params, mask, compact=is_compact)
                row_mask[f"touch-only loop {key}{suffix}"] = key
    for key, mask in masks.items():
        if mask.num_selected < mask.num_total:
            hooks = restriction_steps(params, mask, key)
            steps.update(hooks)
            row_mask.update({name: key for name in hooks})

    fused = "torch AdamW fused"
    rows, targets, runs = [], [], []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        load_before = load_average()
        copy_gbps = copy_bandwidth()
        wall, cpu = time_rounds(steps, rounds)
        copy_gbps = max(copy_gbps, copy_bandwidth())  # measured before and after the steps, best of both
        if torch.get_num_threads() != threads:
            raise RuntimeError(f"torch's thread count changed from {threads} to {torch.get_num_threads()} during the "
                               "run: the comparison would not be at equal thread counts")
        runs.append(dict(threads=threads, copy_gbps=copy_gbps, load=f"{load_before} -> {load_average()}"))
        median = {name: statistics.median(t) for name, t in wall.items()}
        dense_state = state_bytes_of(optimizers[fused])
        for name in steps:
            mask = masks.get(row_mask.get(name))
            density = mask.num_selected / mask.num_total if mask is not None else 1.0
            bits = 8 if ("8-bit" in name or "8bit" in name) else 32
            opt = optimizers.get(name)
            row = dict(threads=threads, provider=name, density=density, step_ms=median[name] * 1e3,
                       cpu_ms=statistics.median(cpu[name]) * 1e3, step_ratio_vs_fused=median[name] / median[fused],
                       state_bytes="", state_ratio_vs_fused="", gradient_bytes="", effective_gbps="",
                       copy_gbps=copy_gbps)
            if opt is not None:
                row["state_bytes"] = state_bytes_of(opt)
                row["state_ratio_vs_fused"] = state_bytes_of(opt) / dense_state
                row["gradient_bytes"] = gradient_bytes(params, mask, "compact" in name)
            if (opt is None and "hook" not in name) or isinstance(opt, MaskedAdamW):
                moved, _ = traffic(mask, bits, line_bytes=64, compact_grads="compact" in name)
                row["effective_gbps"] = moved / median[name] / 1e9
            rows.append(row)
        targets.append((threads, "state d=10% fp32 <= 0.15x torch AdamW",
                        _row(rows, threads, "MaskedAdamW d=10%")["state_ratio_vs_fused"], 0.15))
        if 8 in args.state_bits:
            targets.append((threads, "state d=10% 8-bit <= 0.05x torch AdamW",
                            _row(rows, threads, "MaskedAdamW d=10% 8-bit")["state_ratio_vs_fused"], 0.05))
        for density, limit in ((0.1, 0.5), (0.01, 0.1)):
            for suffix in ("", " compact grads"):
                targets.append((threads, f"CPU step d={density:.0%}{suffix} <= {limit}x fused",
                                _row(rows, threads, f"MaskedAdamW d={density:.0%}{suffix}")["step_ratio_vs_fused"],
                                limit))

    kernel_rows = []
    for key, mask in masks.items():
        for bits in args.state_bits:
            for is_compact in (False, True) if mask.num_selected < mask.num_total else (False,):
                counted, minimum = traffic(mask, bits, line_bytes=32, compact_grads=is_compact)
                kernel_rows.append(dict(mask=key, state_bits=bits, gradients="compact" if is_compact else "dense",
                                        counted_bytes_per_param=counted / total,
                                        minimum_bytes_per_param=minimum / total,
                                        counted_over_minimum=counted / minimum, dense_fused_bytes_per_param=28.0))
    locality = [dict(mask=key, density=mask.num_selected / mask.num_total,
                     lines_touched=sum(lines_touched(s.reshape(-1).numpy(), 4, 64) for s in mask.selections.values())
                     / sum(-(-s.numel() // 16) for s in mask.selections.values()))
                for key, mask in masks.items()]
    write_results(rows, kernel_rows, targets, runs, total, rounds, args.quick, locality)


def _row(rows, threads, provider):
    return next(r for r in rows if r["provider"] == provider and r["threads"] == threads)


def write_results(rows, kernel_rows, targets, runs, total, rounds, quick, locality) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if quick else ""
    write_csv(RESULTS / f"optimizer_step{suffix}.csv", rows)
    write_csv(RESULTS / f"optimizer_step_kernel_bytes{suffix}.csv", kernel_rows)

    fmt = lambda value, spec: "" if value == "" else format(value, spec)  # noqa: E731
    lines = [
        f"# Optimizer step, SmolLM2-135M shapes ({total / 1e6:.1f}M fp32 parameters{', quick run' if quick else ''})",
        "",
        f"`{' '.join(['TRITON_INTERPRET=1', '.venv/bin/python', *sys.argv])}` — median of {rounds} interleaved "
        "rounds; every provider at the same thread count (torch's; MaskedAdamW's numba path follows it).",
    ]
    for run in runs:
        threads = run["threads"]
        lines += [
            "",
            f"## {threads} thread{'s' if threads > 1 else ''}",
            "",
            f"Copy bandwidth in the same run: {run['copy_gbps']:.1f} GB/s (read + write counted); load average "
            f"(1/5/15 min) {run['load']}.",
            "",
            "| provider | step (ms) | vs fused | CPU time (ms) | state (MB) | state vs fused | gradients (MB) | "
            "effective GB/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in (r for r in rows if r["threads"] == threads):
            state_mb = "" if r["state_bytes"] == "" else r["state_bytes"] / 1e6
            grad_mb = "" if r["gradient_bytes"] == "" else r["gradient_bytes"] / 1e6
            lines.append(f"| {r['provider']} | {r['step_ms']:.1f} | {r['step_ratio_vs_fused']:.3f} | "
                         f"{r['cpu_ms']:.1f} | {fmt(state_mb, '.1f')} | {fmt(r['state_ratio_vs_fused'], '.3f')} | "
                         f"{fmt(grad_mb, '.1f')} | {fmt(r['effective_gbps'], '.1f')} |")
    lines += [
        "",
        "Effective GB/s = bytes the step must move (64-byte cache lines of grad and param holding a selected entry, "
        "read, and param written back; compact state read and written; bitmask and offsets) / step time. The "
        "touch-only loop reads the selected grads and reads and writes the selected params entry by entry through "
        "a precomputed index list, and nothing else (its GB/s column counts the same bytes as the step's): the "
        "floor of any step that moves entries one at a time (its *compact grads* variant reads a contiguous "
        "compact gradient). It is not a floor for the block path, which moves whole 16-entry cache lines "
        "with AVX-512 (rows without *general path*, on a CPU with AVX-512); *general path* rows are the per-entry "
        "path that bf16/fp16 parameters and 8-bit state take, on the same fp32 tensors "
        "(`SPARSE_RL_CPU_BLOCKS=0`).",
        "",
        "*compact grads* rows step from compact gradients (`SparseConfig(compact_grads=True)`): the selected gradient "
        "entries only, so the step reads no dense gradient. The copy into them happens during backward, in the "
        "gradient hook, in place of the dense hook's masking: the *hook* rows time both hooks over the same "
        "gradients, once per backward (a cost of the backward, not of the step). Gradients (MB) = what gradients "
        "hold while the optimizer runs: dense fp32 (+ the dense hook's 1-byte bool mask), or compact fp32 + the "
        "compact hook's int32 indices.",
        "",
        "Share of the fp32 parameters' 64-byte cache lines that hold a selected entry (each is read and written "
        "by the step, whatever its other 15 entries): "
        + "; ".join(f"{r['mask']}: {r['lines_touched']:.1%}" for r in locality) + ".",
        "",
        "## Triton kernel: bytes per step per parameter (counted from its loads and stores)",
        "",
        "Counted at 32-byte-sector granularity (what DRAM moves on a GPU) against the minimum for the layout "
        "(only the selected values + bitmask and offsets). Dense fused AdamW in fp32 moves 28 B/param.",
        "",
        "| mask | state | gradients | counted B/param | minimum B/param | counted / minimum |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in kernel_rows:
        lines.append(f"| {r['mask']} | {'8-bit' if r['state_bits'] == 8 else 'fp32'} | {r['gradients']} | "
                     f"{r['counted_bytes_per_param']:.2f} | {r['minimum_bytes_per_param']:.2f} | "
                     f"{r['counted_over_minimum']:.2f} |")
    lines += ["", "## Targets", "", "| threads | target | measured | met |", "|---:|---|---:|---|"]
    for threads, label, value, limit in targets:
        lines.append(f"| {threads} | {label} | {value:.3f} | {'yes' if value <= limit else 'no'} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"optimizer_step{suffix}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
