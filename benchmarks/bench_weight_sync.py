"""Sparse weight sync on real GRPO runs of SmolLM2-135M: patch bytes, build time, two-process sync time, memory.

Each run trains the demo's GRPO trainer (``sparse_rl.demo.build_demo_trainer``: few-shot addition, 16 completions of
6 tokens per step, fp32 weights, compact gradients, a mask from a 2-batch gradient probe) and, after every optimizer
step:

- builds the sparse patch (``PatchProducer.build``, bf16 server dtype) two ways, the *scan* (reads the selected
  entries out of the fp32 parameters) and the *fused scan* (compares the bf16 copy ``MaskedAdamW`` keeps during its
  step with the last-sent values), checks that both give the same bytes, and builds a whole-model bf16 diff with int32
  indices (the verl ``delta_sharded`` / PULSE scheme: an N-entry bf16 snapshot, every entry cast and compared), timing
  all three;
- sends the patch to a receiver process (``python -m sparse_rl.sync.serve``, bf16 SmolLM2, gloo over loopback)
  which validates and applies it and answers, then checks that the receiver's weights equal the trainer's weights
  rounded to bf16 bit for bit (SHA-256 of both, untimed; every ``--digest-every`` steps);
- sends the full bf16 weights to the same receiver (one gloo send per tensor, copied into its model: what TRL sends
  today), timed the same way.

The fused scan moves work into the optimizer step, so its build time counts it: every optimizer step runs twice on
the same gradients and state, once with the rounded copy and once without (the order alternating between steps,
parameters, state and gradients restored in between, untimed), and the fused build is the median difference of the
two step times plus the time of ``build()`` itself.

Bytes per step: the encoded patch (header included; positions in the smallest encoding per tensor), the same patch
with an int32 flat index per value, the whole-model diff (6 bytes per changed entry), and the full bf16 weights.
Anchors are included (the first sync is one; ``--anchor-every`` adds more).

    OMP_NUM_THREADS=1 python benchmarks/bench_weight_sync.py    # writes benchmarks/results/weight_sync.md

Each run is cached in ``benchmarks/results/weight_sync/<run>.json``; a rerun skips finished runs (``--force`` redoes).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import RESULTS_DIR, child_command, cpu_description, emit_result, load_average, run_child, write_result

RESULTS = RESULTS_DIR / "weight_sync.md"
RUN_DIR = RESULTS_DIR / "weight_sync"
RUNS = {  # name: (density, learning rate); the order they run in
    "d10-lr1e-6": (0.10, 1e-6),
    "d10-lr3e-5": (0.10, 3e-5),
    "d05-lr3e-5": (0.05, 3e-5),
    "d30-lr3e-5": (0.30, 3e-5),
}
COMMAND = "OMP_NUM_THREADS=1 python benchmarks/bench_weight_sync.py"


class WholeModelDiff:
    """The baseline sender: an N-entry snapshot in the server dtype; each step casts and compares every entry and
    emits int32 indices + values of the changed ones."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        self.params = dict(model.named_parameters())
        self.snapshot = {name: p.detach().to(dtype).reshape(-1).clone() for name, p in self.params.items()}
        self.dtype = dtype

    def snapshot_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.snapshot.values())

    @torch.no_grad()
    def build(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        patch = {}
        for name, param in self.params.items():
            current = param.detach().reshape(-1).to(self.dtype)
            last = self.snapshot[name]
            changed = (current.view(torch.int16) != last.view(torch.int16)).nonzero().squeeze(1)
            if changed.numel():
                values = current.index_select(0, changed)
                last.index_copy_(0, changed, values)
                patch[name] = (changed.to(torch.int32), values)
        return patch


class TwinSteps:
    """Runs each ``MaskedAdamW.step`` twice on the same gradients and state, with and without the rounded copy of the
    fused scan (order alternating), and records both times in ``times`` (``step_tracked_s``, ``step_plain_s``).

    Between the two, parameters, moments, step counts and compact gradients are put back (untimed); both runs give
    the same bits (tests/test_weight_sync.py checks that tracking leaves the step's results unchanged). The optimizer's
    private launch-table cache is kept per mode so that neither run rebuilds its table."""

    def __init__(self, optimizer, times: dict):
        from sparse_rl.restrict.compact import ATTRIBUTE, compact_grad_of

        self.optimizer, self.times, self.count = optimizer, times, 0
        self.compact_grad_of, self.attribute = compact_grad_of, ATTRIBUTE
        self.tables = {"tracked": optimizer._tensor_tables, "plain": {}}
        self.step = optimizer.step
        optimizer.step = self

    def __call__(self, closure=None):
        optimizer = self.optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]
                  if p.grad is not None or self.compact_grad_of(p) is not None]
        saved = {p: (p.detach().clone(), None if p.grad is None else p.grad.clone(),
                     None if self.compact_grad_of(p) is None else self.compact_grad_of(p).clone(),
                     {k: v.clone() for k, v in optimizer.state[p].items()}) for p in params}
        rounded = optimizer._rounded
        order = ("tracked", "plain") if self.count % 2 == 0 else ("plain", "tracked")
        self.count += 1
        for i, mode in enumerate(order):
            if i:  # put everything back as before the first run
                for p, (value, grad, compact, state) in saved.items():
                    p.data.copy_(value)
                    p.grad = grad
                    setattr(p, self.attribute, compact)
                    if state:  # in place: the launch tables hold the state's addresses
                        for k, v in state.items():
                            optimizer.state[p][k].copy_(v)
                    else:  # the first step creates the state (and clears the tables)
                        optimizer.state.pop(p, None)
            optimizer._rounded = rounded if mode == "tracked" else {}
            optimizer._tensor_tables = self.tables[mode]
            t0 = time.perf_counter()
            self.step(closure)
            self.times[f"step_{mode}_s"] = time.perf_counter() - t0
        optimizer._rounded = rounded
        optimizer._tensor_tables = self.tables["tracked"]
        if any(not state for *_, state in saved.values()):  # the state was created twice: forget the first's tables
            for tables in self.tables.values():
                tables.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(name: str, steps: int, probe_steps: int, anchor_every: int, digest_every: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from sparse_rl import SparseConfig, sparsify
    from sparse_rl.demo import DemoConfig, build_demo_trainer, demo_rows
    from sparse_rl.discovery import ProbeOptions
    from sparse_rl.models import smollm2_checkpoint
    from sparse_rl.optim import unwrap_optimizer
    from sparse_rl.sync import DistributedPatchSink, PatchProducer, encode_patch, weights_digest
    from sparse_rl.sync.transport import connect

    density, lr = RUNS[name]
    dtype = torch.bfloat16
    checkpoint = smollm2_checkpoint()
    tmp = Path(tempfile.mkdtemp(prefix="bench-weight-sync-"))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    config = DemoConfig(density=density, steps=steps, learning_rate=lr, probe_steps=probe_steps,
                        output_dir=str(tmp / "out"))
    train_rows, _ = demo_rows(config)
    trainer = build_demo_trainer(config, model, tokenizer, train_rows)
    trainer.args.disable_tqdm = True
    sparse = sparsify(trainer, SparseConfig(density=density, discovery="gradient",
                                            probe=ProbeOptions(steps=probe_steps), compact_grads=True))
    mask_path = tmp / "mask.safetensors"
    sparse.mask.save(mask_path)
    num_parameters = sum(p.numel() for p in model.parameters())

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    receiver = subprocess.Popen([sys.executable, "-m", "sparse_rl.sync.serve", str(checkpoint), str(mask_path),
                                 "--port", str(port)], env=env)
    started = time.perf_counter()
    producer = PatchProducer(model, sparse.mask, server_dtype=dtype, anchor_every=anchor_every)
    producer_setup = time.perf_counter() - started
    # first_sync="base": only its first patch differs from the anchor-first stream's, so only that one is measured
    base_first: dict = {"producer": PatchProducer(model, sparse.mask, server_dtype=dtype, first_sync="base")}
    fused = PatchProducer(model, sparse.mask, server_dtype=dtype, anchor_every=anchor_every,
                          optimizer=lambda: trainer.optimizer, fused_scan="on")
    whole = WholeModelDiff(model, dtype)
    group = connect("127.0.0.1", port, rank=0)
    sink = DistributedPatchSink(peer=1, group=group)
    params = list(model.named_parameters())
    steps_log: list[dict] = []

    step_times: dict = {}

    class Measure(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            TwinSteps(unwrap_optimizer(trainer.optimizer), step_times)

        def on_step_end(self, args, state, control, **kwargs):
            row = {"step": state.global_step, **step_times}
            if "producer" in base_first:
                first = base_first.pop("producer").build()
                base_first.update(bytes=len(encode_patch(first)), values=first.num_values)
            t0 = time.perf_counter()
            patch = producer.build()
            row["build_patch_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            data = encode_patch(patch)
            row["encode_patch_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            diff = whole.build()
            row["build_whole_diff_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            fused_patch = fused.build()
            row["build_fused_collect_s"] = time.perf_counter() - t0
            fused_patch.stream = patch.stream
            row["fused_equal"] = fused.fused and encode_patch(fused_patch) == data
            t0 = time.perf_counter()
            sink(data)
            row["send_apply_patch_s"] = time.perf_counter() - t0
            if state.global_step % digest_every == 0 or state.global_step in (1, 2, steps):
                row["receiver_equal"] = sink.digest() == weights_digest(params, dtype)
            t0 = time.perf_counter()
            full = [(n, p.detach().to(dtype)) for n, p in params]
            row["cast_full_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            sink.send_full(full)
            row["send_apply_full_s"] = time.perf_counter() - t0
            row.update(
                anchor=patch.anchor, patch_values=patch.num_values, patch_bytes=len(data),
                patch_flat_i32_bytes=6 * patch.num_values,
                encodings={e: sum(t.encoding == e for t in patch.tensors) for e in ("all", "flat_i32", "rank_u16",
                                                                                     "rank_bits", "rank_gaps")},
                tensors=len(patch.tensors),
                whole_diff_values=sum(int(i.numel()) for i, _ in diff.values()),
                whole_diff_bytes=sum(6 * int(i.numel()) for i, _ in diff.values()),
                full_bytes=2 * num_parameters, load_average=load_average())
            steps_log.append(row)
            print(json.dumps(row), flush=True)

    trainer.add_callback(Measure())
    train_started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_started
    sink.stop()
    receiver.wait(timeout=120)
    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    return {
        "run": name, "density": density, "learning_rate": lr, "steps": steps, "probe_steps": probe_steps,
        "anchor_every": anchor_every, "num_parameters": num_parameters, "num_selected": sparse.mask.num_selected,
        "snapshot_bytes": producer.snapshot_bytes(), "index_bytes": producer.index_bytes(),
        "fused_snapshot_bytes": fused.snapshot_bytes(), "fused_rounded_bytes": fused.rounded_bytes(),
        "fused_index_bytes": fused.index_bytes(),
        "whole_diff_snapshot_bytes": whole.snapshot_bytes(), "model_copy_fp32_bytes": 4 * num_parameters,
        "producer_setup_s": producer_setup, "train_seconds": train_seconds, "rewards": rewards,
        "torch_threads": torch.get_num_threads(), "steps_log": steps_log,
        "base_first_patch_bytes": base_first.get("bytes"), "base_first_patch_values": base_first.get("values"),
    }


def _base_first(run: dict, full: int) -> str:
    """Mean bytes per sync when the first patch is relative to the base (``first_sync="base"``) instead of an anchor:
    the measured first patch replaces the anchor, the other steps are the same patches."""
    log = run["steps_log"]
    first = run.get("base_first_patch_bytes")
    if first is None:
        return "not measured"
    total = first + sum(s["patch_bytes"] for s in log[1:])
    return f"{total / len(log) / full:.4f}x, {total / sum(s['whole_diff_bytes'] for s in log):.3f}x"


def _median_ratio(log: list[dict]) -> str:
    rest = [s for s in log if not s["anchor"]]
    if not rest:
        return "no non-anchor step"
    patch = statistics.median(s["build_patch_s"] for s in rest)
    whole = statistics.median(s["build_whole_diff_s"] for s in rest)
    return f"{patch * 1e3:.0f} / {whole * 1e3:.0f} ms = {patch / whole:.3f}x"


def _fused_row(r: dict) -> str:
    log = r["steps_log"]
    rest = [s for s in log if not s["anchor"]]
    if not rest or "build_fused_collect_s" not in rest[0]:
        return f"| {r['run']} | not measured (run cached before the fused scan) |" + " |" * 10
    median = lambda key: statistics.median(s[key] for s in rest)  # noqa: E731
    whole, scan = median("build_whole_diff_s"), median("build_patch_s")
    plain, tracked, collect = median("step_plain_s"), median("step_tracked_s"), median("build_fused_collect_s")
    difference = statistics.median(s["step_tracked_s"] - s["step_plain_s"] for s in rest)
    fused = max(difference, 0.0) + collect
    loads = [s["load_average"] for s in log if s.get("load_average") is not None]
    load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "?"
    ms = lambda x: f"{x * 1e3:.0f} ms"  # noqa: E731
    return (f"| {r['run']} | {load} | {ms(whole)} | {ms(scan)} | {scan / whole:.3f}x | {ms(plain)} | {ms(tracked)} | "
            f"{difference * 1e3:+.1f} ms | {collect * 1e3:.1f} ms | {ms(fused)} | **{fused / whole:.3f}x** | "
            f"{sum(s.get('fused_equal') is True for s in log)}/{len(log)} |")


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def report(results: list[dict], cpu: str) -> str:
    lines = [
        "# Sparse weight sync: SmolLM2-135M GRPO, fp32 trainer, bf16 server",
        "",
        f"Command: `{COMMAND}` (each run cached in `benchmarks/results/weight_sync/`). CPU: {cpu}; "
        "trainer and receiver on one thread each, gloo over loopback. Every row: mean over the run's steps "
        "(anchors included: the first sync is an anchor), unless it says median. The machine is shared (2 cores, "
        "load average 4-9 during the runs, per run in the build table below): timings move by tens of percent "
        "between runs.",
        "",
        "## Bytes per sync",
        "",
        "| run | selected | steps | patch / full bf16 | patch (int32 flat) / full | whole-model diff / full | "
        "patch / whole diff | anchor / full | first sync from the base: patch / full, / whole diff | "
        "receiver == trainer in bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        log = r["steps_log"]
        full = log[0]["full_bytes"]
        lines.append(
            f"| {r['run']} | {r['num_selected'] / r['num_parameters']:.2%} | {len(log)} | "
            f"{mean(s['patch_bytes'] for s in log) / full:.4f}x | "
            f"{mean(s['patch_flat_i32_bytes'] for s in log) / full:.4f}x | "
            f"{mean(s['whole_diff_bytes'] for s in log) / full:.4f}x | "
            f"{mean(s['patch_bytes'] for s in log) / mean(s['whole_diff_bytes'] for s in log):.3f}x | "
            f"{log[0]['patch_bytes'] / full:.3f}x | {_base_first(r, full)} | "
            f"{sum(s.get('receiver_equal') is True for s in log)}/{sum('receiver_equal' in s for s in log)} checked "
            "steps |")
    lines += [
        "",
        "Patch: the encoded patch with its header, positions per tensor in the smallest of int32 flat index / uint16 "
        "rank within the selection / one bit per selected entry / varint gaps between ranks, anchors without "
        "positions. Patch (int32 flat): 6 "
        "bytes per value (what vLLM's `sparse_nccl` engine takes). Whole-model diff: 6 bytes per entry whose bf16 "
        "value changed, over the whole model, the first sync diffed against the base (no anchor). Full: 2 bytes per "
        "parameter. First sync from the base: `WeightSyncConfig(first_sync=\"base\")`, the first patch holds the "
        "selected entries that differ from the base (as the whole-model diff's first sync) instead of every selected "
        "entry.",
        "",
        "## Time per sync (sender side)",
        "",
        "| run | build patch (scan) | build whole-model diff | patch / whole diff | encode patch | "
        "send + apply patch | send + apply full bf16 | send + apply: patch / full | cast full to bf16 | "
        "all: patch / full | build: patch / whole diff, median of non-anchor steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        log = r["steps_log"]
        build = mean(s["build_patch_s"] for s in log)
        whole = mean(s["build_whole_diff_s"] for s in log)
        encode = mean(s["encode_patch_s"] for s in log)
        send = mean(s["send_apply_patch_s"] for s in log)
        full = mean(s["send_apply_full_s"] for s in log)
        cast = mean(s["cast_full_s"] for s in log) if "cast_full_s" in log[0] else None
        total = "not measured" if cast is None else f"{(build + encode + send) / (cast + full):.3f}x"
        cast_text = "not measured" if cast is None else f"{cast * 1e3:.1f} ms"
        lines.append(f"| {r['run']} | {build * 1e3:.1f} ms | {whole * 1e3:.1f} ms | {build / whole:.3f}x | "
                     f"{encode * 1e3:.1f} ms | {send * 1e3:.1f} ms | {full * 1e3:.1f} ms | {send / full:.3f}x | "
                     f"{cast_text} | {total} | {_median_ratio(log)} |")
    lines += [
        "",
        "## Building a patch: scan against fused scan, against a whole-model diff (medians of non-anchor steps)",
        "",
        "| run | load (1 min) | whole-model diff | scan | scan / diff | step without copy | step with copy | "
        "step difference | fused build() | fused: difference + build() | fused / diff | fused patches == scan "
        "patches |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(_fused_row(r))
    lines += [
        "",
        "Scan: `PatchProducer(model, mask)`, which reads the selected entries out of the fp32 parameters. Fused scan: "
        "`PatchProducer(model, mask, optimizer=...)` (what `attach_weight_sync` uses with a CPU `MaskedAdamW`): the "
        "optimizer writes a bf16 copy of the selected entries during its step and `build()` compares it with the "
        "last-sent values. Its cost counts both: every optimizer step ran twice on the same gradients and state, "
        "with and without the copy (order alternating by step), and the step difference is the median of the "
        "per-step differences (it can come out negative when the load moves between the two runs). Fused patches "
        "== scan patches: steps whose encoded patches were byte-identical (stream id aside).",
        "",
        "Send + apply: patch = send the encoded patch + the receiver's validation and in-place writes + its answer; "
        "full = send every bf16 tensor + the receiver's copy into its model + its answer. All: patch = build + encode "
        "+ send + apply; full = cast the fp32 weights to bf16 + send + apply. Means over all steps, anchors included.",
        "",
        "## Sender memory",
        "",
        "| run | last-sent values | + selection indices (int32) | fp32 model copy | bf16 snapshot of a whole-model "
        "diff | (values + indices) / fp32 copy | (values + indices) / bf16 snapshot |",
        "|---|---|---|---|---|---|---|",
    ]
    fused_memory = [r for r in results if "fused_rounded_bytes" in r]
    for r in results:
        mine = r["snapshot_bytes"] + r["index_bytes"]
        lines.append(f"| {r['run']} | {r['snapshot_bytes'] / 2**20:.1f} MiB | {mine / 2**20:.1f} MiB | "
                     f"{r['model_copy_fp32_bytes'] / 2**20:.1f} MiB | {r['whole_diff_snapshot_bytes'] / 2**20:.1f} MiB "
                     f"| {mine / r['model_copy_fp32_bytes']:.3f}x | {mine / r['whole_diff_snapshot_bytes']:.3f}x |")
    if fused_memory:
        lines += [
            "",
            "With the fused scan the sender keeps no indices (a patch that needs flat indices decodes them from the "
            "optimizer's selection bitmask, which the optimizer holds anyway); the optimizer keeps the bf16 copy:",
            "",
            "| run | last-sent values | + the optimizer's bf16 copy | + indices | fp32 model copy | all / fp32 copy | "
            "all / bf16 snapshot |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in fused_memory:
            mine = r["fused_snapshot_bytes"] + r["fused_rounded_bytes"] + r["fused_index_bytes"]
            lines.append(f"| {r['run']} | {r['fused_snapshot_bytes'] / 2**20:.1f} MiB | "
                         f"{r['fused_rounded_bytes'] / 2**20:.1f} MiB | {r['fused_index_bytes'] / 2**20:.1f} MiB | "
                         f"{r['model_copy_fp32_bytes'] / 2**20:.1f} MiB | {mine / r['model_copy_fp32_bytes']:.3f}x | "
                         f"{mine / r['whole_diff_snapshot_bytes']:.3f}x |")
    lines += ["", "## Per step", ""]
    for r in results:
        lines.append(f"### {r['run']} (density {r['density']}, lr {r['learning_rate']}; training reward by logging "
                     f"window: {', '.join(f'{x:.2f}' for x in r['rewards'])})")
        lines += ["", "| step | anchor | values | patch bytes | whole-diff bytes | tensors by encoding "
                  "(all/flat/u16/bits/gaps) |", "|---|---|---|---|---|---|"]
        for s in r["steps_log"]:
            e = s["encodings"]
            lines.append(f"| {s['step']} | {'yes' if s['anchor'] else ''} | {s['patch_values']:,} | "
                         f"{s['patch_bytes']:,} | {s['whole_diff_bytes']:,} | "
                         f"{e['all']}/{e['flat_i32']}/{e['rank_u16']}/{e['rank_bits']}/{e.get('rank_gaps', '?')} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--probe-steps", type=int, default=2, help="gradient-probe batches for the mask")
    parser.add_argument("--anchor-every", type=int, default=0)
    parser.add_argument("--digest-every", type=int, default=5,
                        help="check the receiver's weights against the trainer's every this many steps (and at steps "
                        "1, 2 and the last)")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        emit_result(run_one(args.child, args.steps, args.probe_steps, args.anchor_every, args.digest_every))
        return
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.runs:
        path = RUN_DIR / f"{name}.json"
        if path.exists() and not args.force:
            results.append(json.loads(path.read_text()))
            continue
        print(f"== run {name}", flush=True)
        result = run_child(child_command(__file__, "--child", name, "--steps", args.steps, "--probe-steps",
                                         args.probe_steps, "--anchor-every", args.anchor_every, "--digest-every",
                                         args.digest_every), threads=1)
        path.write_text(json.dumps(result))
        results.append(result)
    write_result(report(results, cpu_description()), RESULTS, write=not args.no_write)


if __name__ == "__main__":
    main()
