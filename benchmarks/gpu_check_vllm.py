"""Section 4 of ``make gpu-check``: the sparse weight sync into a real vLLM, end to end, under TRL's GRPOTrainer.

**Colocate** (``use_vllm=True, vllm_mode="colocate"``, vLLM in the trainer's process): SmolLM2-135M-Instruct (the cached
conversion, ``sparse_rl.models.smollm2_checkpoint()``) with fp32 weights, a random 10% mask, ``attach_weight_sync``
replacing TRL's ``VLLMGeneration.sync_weights``; a few GRPO steps, with TRL calling the sync before each generation.

- vLLM's weights are read back with ``LLM.apply_model`` (``vllm/entrypoints/llm.py``: it runs
  ``collective_rpc("apply_model", args=(func,))``, and ``WorkerBase.apply_model`` in ``vllm/v1/worker/worker_base.py``
  returns ``func(self.get_model())``). TRL starts the colocated engine with ``distributed_executor_backend=
  "external_launcher"``, which sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (``ParallelConfig.__post_init__`` in
  ``vllm/config/parallel.py``): the worker lives in this process and the function is called, not serialised.
  The fused parameters (``qkv_proj``, ``gate_up_proj``) are cut back into Hugging Face tensors with
  :class:`~sparse_rl.sync.vllm.FusedLayout` and compared bit for bit with the trainer's weights cast to vLLM's dtype:
  once before training (vLLM's own loader against the layout), once after the last step's sync, once after TRL's own
  full syncs. The comparison is shown not to be vacuous in the same run: training must have changed bf16 entries, and
  one flipped bit in a copy of the read-back must be caught.
- Greedy generations of vLLM and of the trained weights cast to vLLM's dtype in a fresh Hugging Face model (argmax
  over the whole sequence per token) on a few of the task's prompts; attention kernels differ, so the check asks for
  every first token and at least half the sequences to agree.
- Per sync: time (device synchronised) and bytes of the sparse patches against TRL's own full sync
  (``VLLMGeneration.sync_weights`` as TRL wrote it, ``load_weights`` of every parameter) in the same process.

**Server** (``vllm_mode="server"``, when a second GPU is available): ``trl vllm-serve --worker-extension-cls
sparse_rl.sync.vllm.SparsePatchWorkerExtension`` on a free loopback port and another GPU (NCCL, which TRL's client
opens for its own weight transfer, does not put two ranks of one group on one device), patches through vLLM's
``POST /collective_rpc`` (``vllm/entrypoints/serve/dev/rpc/api_router.py``: string arguments, dict/list results passed
through), and the same bit-for-bit check through SHA-256 digests of the server's un-fused tensors
(``SparsePatchWorkerExtension.sparse_rl_weight_digests``) before training, after it and after TRL's own full sync (its
NCCL broadcast), whose time and bytes the patches are measured against.

The dry run has no vLLM: ``tests/vllm_emulation.py`` stands in for it (``FakeLLM``: vLLM's fused runtime parameters and
``load_weights``, written from vLLM's loaders independently of ``FusedLayout``), TRL's real
``VLLMGeneration.sync_weights`` and ``attach_weight_sync`` run against it, a callback calls the sync where TRL's
generation would, and everything else (read-back, un-fusing, comparison, corruption check, generations, timings) is the
code of the GPU run. Without vLLM on a GPU, the section says so and the other sections run as usual.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

DENSITY = 0.10
MIB = 2**20


@dataclass(frozen=True)
class VllmSizes:
    grpo_steps: int
    full_syncs: int  # TRL's own full syncs timed after training
    prompts: int  # greedy generation prompts
    max_new_tokens: int
    prompts_per_step: int
    num_generations: int
    max_completion_length: int
    gpu_memory_utilization: float = 0.25
    server_start_timeout: float = 600.0


GPU_VLLM_SIZES = VllmSizes(grpo_steps=6, full_syncs=3, prompts=4, max_new_tokens=16, prompts_per_step=4,
                           num_generations=8, max_completion_length=8)
DRY_VLLM_SIZES = VllmSizes(grpo_steps=2, full_syncs=2, prompts=2, max_new_tokens=3, prompts_per_step=1,
                           num_generations=4, max_completion_length=4)


@dataclass
class Check:
    name: str
    passed: bool | None  # None: skipped
    detail: str


@dataclass
class SyncTiming:
    mode: str  # "colocate" or "server": rows are compared with TRL's full sync of the same mode
    label: str
    times_ms: list[float] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)
    anchors: list[bool] = field(default_factory=list)
    note: str = ""


@dataclass
class VllmSection:
    available: str  # the vLLM version, "emulated (dry run)", or why it is missing
    checks: list[Check] = field(default_factory=list)
    timings: list[SyncTiming] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    server_bytes: int = 0  # the full weights in the server dtype

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if c.passed is False]


# ------------------------------------------------------------------------------------------------ comparison
@dataclass
class WeightComparison:
    tensors: int
    entries: int
    differing: list[str]  # one line per problem, naming the Hugging Face tensor
    uncovered: list[str] = field(default_factory=list)  # vLLM parameters of no Hugging Face tensor (not synced)

    @property
    def passed(self) -> bool:
        return not self.differing and self.tensors > 0

    def detail(self) -> str:
        extra = ""
        if self.uncovered:
            extra = f"; not compared, vLLM-only parameters: {', '.join(self.uncovered[:3])}"
            extra += f" and {len(self.uncovered) - 3} more" if len(self.uncovered) > 3 else ""
        if self.passed:
            return f"{self.tensors} tensors, {self.entries:,} entries equal bit for bit{extra}"
        return f"{len(self.differing)} problem(s) in {self.tensors} tensors: " + "; ".join(self.differing[:4]) + extra


def compare_runtime_weights(runtime_params: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                            layout) -> WeightComparison:
    """vLLM's runtime (fused) parameters, cut into Hugging Face tensors with ``layout``, against ``expected`` (Hugging
    Face names, already in the server dtype, as ``named_parameters()`` gives them: a tied ``lm_head`` is not among
    them): dtypes, shapes and every bit. A tensor vLLM does not hold counts as a problem, and so does a fused
    parameter of another size than its shards; runtime parameters no Hugging Face tensor maps to are listed, not
    compared (they are not synced)."""
    differing, misshapen = [], set()
    for runtime, shape in layout.runtime_shapes.items():
        if runtime in runtime_params:
            actual = tuple(runtime_params[runtime].shape)
            padded_rows_only = "embed_tokens" in runtime and actual[1:] == shape[1:] and actual[0] >= shape[0]
            if actual != shape and not padded_rows_only:
                differing.append(f"{runtime}: shape {actual} in vLLM, the shards make {shape}")
                misshapen.add(runtime)
    covered = {t.runtime_name for t in layout.targets.values()}
    uncovered = sorted(set(runtime_params) - covered)  # e.g. kv-cache scales of a quantized engine: never synced
    views = dict(layout.hf_views({n: p for n, p in runtime_params.items() if n not in misshapen}))
    entries = tensors = 0
    for name, want in expected.items():
        got = views.get(name)
        if got is None:
            if layout[name].runtime_name not in runtime_params:
                differing.append(f"{name}: not in vLLM's parameters")
            continue
        tensors += 1
        if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
            differing.append(f"{name}: {got.dtype} {tuple(got.shape)} in vLLM, expected {want.dtype} "
                             f"{tuple(want.shape)}")
            continue
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[want.element_size()]
        unequal = got.reshape(-1).view(bits) != want.to(got.device).reshape(-1).view(bits)
        entries += want.numel()
        if bool(unequal.any()):
            first = int(unequal.nonzero()[0, 0])
            differing.append(f"{name}: {int(unequal.sum()):,} entries differ, first at flat index {first} (vLLM "
                             f"{got.reshape(-1)[first].item()!r}, expected {want.reshape(-1)[first].item()!r})")
    return WeightComparison(tensors, entries, differing, uncovered)


def digest_check(label: str, server: dict[str, str], trainer: dict[str, str]) -> Check:
    """The server's :func:`~sparse_rl.sync.vllm.weight_digests` against the trainer's: every trainer tensor must have
    the same digest on the server (dtype and SHA-256 of the bytes)."""
    wrong = sorted(name for name in trainer if server.get(name) != trainer[name])
    if not trainer:
        return Check(label, False, "the trainer has no tensors to compare")
    if wrong:
        missing = sum(name not in server for name in wrong)
        return Check(label, False, f"{len(wrong)} of {len(trainer)} tensors differ ({missing} missing on the server): "
                                   + ", ".join(wrong[:4]))
    return Check(label, True, f"{len(trainer)} tensors, dtype and SHA-256 of the bytes equal")


def _cpu_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().to("cpu", copy=True) for name, param in model.named_parameters()}


def read_runtime_weights(llm) -> dict[str, torch.Tensor]:
    """vLLM's runtime parameters, copied to CPU, through ``LLM.apply_model`` (module docstring); one worker
    (tensor parallelism 1). A vLLM without ``apply_model`` is read where TRL's colocate ``sync_weights`` writes
    (``llm.llm_engine.model_executor.driver_worker.model_runner.model``)."""
    if not hasattr(llm, "apply_model"):
        return _cpu_parameters(llm.llm_engine.model_executor.driver_worker.model_runner.model)
    results = llm.apply_model(_cpu_parameters)
    if len(results) != 1:
        raise RuntimeError(f"vLLM answered from {len(results)} workers; the check runs with tensor parallelism 1")
    return results[0]


def flip_one_bit(runtime_params: dict[str, torch.Tensor], layout, hf_name: str) -> dict[str, torch.Tensor]:
    """A copy of ``runtime_params`` with the lowest bit of the last entry of ``hf_name``'s slice flipped (for a fused
    shard such as ``k_proj``, inside ``qkv_proj``): what the comparison must catch."""
    target = layout[hf_name]
    corrupted = dict(runtime_params)
    fused = runtime_params[target.runtime_name].clone()
    bits = {2: torch.int16, 4: torch.int32}[fused.element_size()]
    fused.view(-1).view(bits)[target.flat_offset + target.numel - 1] ^= 1
    corrupted[target.runtime_name] = fused
    return corrupted


def greedy_agreement(ours: list[list[int]], theirs: list[list[int]]) -> tuple[int, int, float]:
    """(identical sequences, sequences whose first token agrees, mean length of the common prefix)."""
    prefixes = []
    for a, b in zip(ours, theirs):
        common = 0
        while common < min(len(a), len(b)) and a[common] == b[common]:
            common += 1
        prefixes.append(common)
    identical = sum(a == b for a, b in zip(ours, theirs))
    first = sum(bool(a) and bool(b) and a[0] == b[0] for a, b in zip(ours, theirs))
    return identical, first, statistics.mean(prefixes) if prefixes else 0.0


def _greedy_params(max_tokens: int):
    try:
        from vllm import SamplingParams
    except ImportError:  # the dry run's FakeLLM reads max_tokens only
        from types import SimpleNamespace

        return SimpleNamespace(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def vllm_greedy(llm, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], _greedy_params(max_new_tokens),
                           use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs]


def _wall_ms(device, fn: Callable[[], object]) -> float:
    device.sync()
    begin = time.perf_counter()
    fn()
    device.sync()
    return (time.perf_counter() - begin) * 1e3


def _vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "(version unknown)")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------ shared setup
def _policy(device, dry_run: bool, workdir: Path, load_tests_module):
    """(fp32 model, tokenizer, folder): SmolLM2-135M-Instruct from its cached conversion, or the tiny Llama."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dry_run:
        tiny = load_tests_module("tiny")
        folder = tiny.save_tiny_checkpoint(workdir / "tiny-llama")
        tokenizer = tiny.make_tiny_tokenizer()
    else:
        from sparse_rl.models import smollm2_checkpoint

        folder = smollm2_checkpoint()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if dry_run:
        model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    return model.to(device.torch), tokenizer, Path(folder)


def _grpo_args(device, sizes: VllmSizes, workdir: Path, **vllm):
    from trl import GRPOConfig

    from sparse_rl.demo import DemoConfig

    demo = DemoConfig()
    return GRPOConfig(
        output_dir=str(workdir / f"grpo-{vllm.get('vllm_mode', 'none')}"), max_steps=sizes.grpo_steps,
        per_device_train_batch_size=sizes.num_generations * sizes.prompts_per_step,
        num_generations=sizes.num_generations, max_completion_length=sizes.max_completion_length,
        learning_rate=demo.learning_rate if device.is_cuda else 1e-2, lr_scheduler_type="constant", weight_decay=0.0,
        temperature=1.0, beta=0.0,
        bf16=device.is_cuda, use_cpu=not device.is_cuda, report_to="none", logging_steps=1, save_strategy="no",
        seed=demo.seed, disable_tqdm=True, **vllm)


def _reward(dry_run: bool, load_tests_module):
    """The demo's addition reward; in the dry run the tests' length reward (the tiny model cannot add, and equal
    rewards give GRPO no gradient)."""
    if dry_run:
        return load_tests_module("tiny").length_reward
    from sparse_rl.demo import addition_reward

    return addition_reward


def _dataset(sizes: VllmSizes):
    from datasets import Dataset

    from sparse_rl.demo import DemoConfig, addition_prompts

    demo = DemoConfig()
    rows = addition_prompts(sizes.grpo_steps * sizes.prompts_per_step + sizes.prompts, 9, demo.seed)
    return Dataset.from_list(rows[sizes.prompts:]), [row["prompt"] for row in rows[: sizes.prompts]]


def _bf16_changed(model, start: dict[str, torch.Tensor], dtype: torch.dtype) -> int:
    return sum(int((p.detach().to("cpu", dtype).view(torch.int16) != start[n].view(torch.int16)).sum())
               for n, p in model.named_parameters())


def _fake_colocate_generation(trainer, load_tests_module):
    """TRL's own ``VLLMGeneration`` (its ``sync_weights``, ``_iter_named_params``) around the emulated engine, built
    without ``_init_vllm`` (which needs vLLM): the dry run's stand-in for ``GRPOTrainer(use_vllm=True)``."""
    from trl.distributed import DistributedBackend
    from trl.generation.vllm_generation import VLLMGeneration

    emulation = load_tests_module("vllm_emulation")
    generation = object.__new__(VLLMGeneration)
    model = trainer.accelerator.unwrap_model(trainer.model)
    generation.__dict__.update(model=model, accelerator=trainer.accelerator,
                               _dist=DistributedBackend(trainer.accelerator), mode="colocate", tensor_parallel_size=1,
                               enable_sleep_mode=False, _llm_weights_sleeping=False, _weight_metadata=None,
                               llm=emulation.FakeLLM(model, torch.bfloat16))
    return generation


# ------------------------------------------------------------------------------------------------ colocate
def colocate_check(device, sizes: VllmSizes, workdir: Path, dry_run: bool, load_tests_module) -> VllmSection:
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from sparse_rl import SparseConfig, sparsify
    from sparse_rl.sync import WeightSyncConfig, attach_weight_sync
    from sparse_rl.sync.vllm import FusedLayout

    section = VllmSection("emulated (dry run)" if dry_run else f"vllm {_vllm_version()}")
    checks = section.checks

    def check(name: str, run: Callable[[], tuple[bool, str]]) -> None:
        try:
            passed, detail = run()
        except Exception as error:
            passed, detail = False, " ".join(f"{type(error).__name__}: {error}".split())[:400]
            print(traceback.format_exc(), file=sys.stderr, flush=True)
        checks.append(Check(name, passed, detail))
        print(f"  [{'pass' if passed else 'FAIL'}] {name}: {detail}", flush=True)

    model, tokenizer, folder = _policy(device, dry_run, workdir, load_tests_module)
    train_rows, prompts = _dataset(sizes)
    vllm_args = {} if dry_run else dict(use_vllm=True, vllm_mode="colocate",
                                        vllm_gpu_memory_utilization=sizes.gpu_memory_utilization,
                                        vllm_max_model_length=1024)
    trainer = GRPOTrainer(model=model, reward_funcs=_reward(dry_run, load_tests_module),
                          args=_grpo_args(device, sizes, workdir, **vllm_args),
                          train_dataset=train_rows, processing_class=tokenizer)
    if dry_run:
        trainer.vllm_generation = _fake_colocate_generation(trainer, load_tests_module)
    generation = trainer.vllm_generation
    llm = generation.llm
    layout = FusedLayout.from_config(model.config)
    runtime = read_runtime_weights(llm)
    dtype = next(iter(runtime.values())).dtype
    section.notes.append(f"vLLM holds the weights in {_dtype_name(dtype)}; the trainer in "
                         f"{_dtype_name(next(model.parameters()).dtype)} (TRL passes no dtype to `LLM`; the "
                         f"checkpoint's is {model.config.dtype}).")
    start = {n: p.detach().to("cpu", dtype) for n, p in model.named_parameters()}
    check("colocate: vLLM's weights as loaded equal the trainer's cast to the server dtype (layout check)",
          lambda: (lambda c: (c.passed, c.detail()))(compare_runtime_weights(runtime, start, layout)))

    def detects_corruption():
        target = next(n for n in layout.targets if ".k_proj." in n) if any(".k_proj." in n for n in layout.targets) \
            else next(iter(layout.targets))
        comparison = compare_runtime_weights(flip_one_bit(runtime, layout, target), start, layout)
        named = [line for line in comparison.differing if line.startswith(f"{target}: 1 entries differ")]
        return bool(named) and len(comparison.differing) == 1, (
            f"one flipped bit in a copy of vLLM's {layout[target].runtime_name} reported as: "
            + (comparison.differing[0] if comparison.differing else "nothing"))
    check("colocate: the read-back comparison catches one flipped bit", detects_corruption)
    runtime = None  # 2 bytes per parameter on the host, not needed any more

    sparse = sparsify(trainer, SparseConfig(density=DENSITY, discovery="random"))
    full_sync = generation.sync_weights  # TRL's own, kept to time it against the sparse sync
    weight_sync = attach_weight_sync(trainer, sparse, WeightSyncConfig(server_dtype=_dtype_name(dtype)))
    sparse_timing = SyncTiming("colocate", f"sparse patch ({DENSITY:.0%} mask, written in process)")
    generation.sync_weights = _timed(device, generation.sync_weights, weight_sync, sparse_timing)
    if dry_run:  # GRPOTrainer without vLLM does not sync: call it where TRL would, before each step's generation
        class GenerationStep(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                generation.sync_weights()

        trainer.add_callback(GenerationStep())
    trainer.train()
    generation.sync_weights()  # the last step's update (TRL sends it before the next generation)
    trained = trainer.accelerator.unwrap_model(trainer.model)
    changed = _bf16_changed(trained, start, dtype)
    expected = {n: p.detach().to("cpu", dtype) for n, p in trained.named_parameters()}

    def after_training():
        comparison = compare_runtime_weights(read_runtime_weights(llm), expected, layout)
        if changed == 0:
            return False, "training changed no entry in the server dtype: the comparison would be vacuous"
        patches = len(weight_sync.history)
        return comparison.passed, (f"{comparison.detail()}; {changed:,} entries moved in training, {patches} syncs "
                                   f"({sum(h['anchor'] for h in weight_sync.history)} anchor)")
    check(f"colocate: after {sizes.grpo_steps} GRPO steps with the sparse sync, vLLM's weights equal the trainer's "
          f"(fp32) cast to the server dtype", after_training)

    def generations():
        from transformers import AutoModelForCausalLM

        # a fresh model from the trained weights (TRL patches the policy's forward with a fused LM head)
        hf_model = AutoModelForCausalLM.from_config(trained.config).to(device.torch, dtype).eval()
        hf_model.load_state_dict({k: v.to(dtype) for k, v in trained.state_dict().items()})
        prompt_ids = [tokenizer(prompt).input_ids for prompt in prompts]
        emulation = load_tests_module("vllm_emulation")
        ours = vllm_greedy(llm, prompt_ids, sizes.max_new_tokens)
        theirs = [emulation.greedy_tokens(hf_model, ids, sizes.max_new_tokens) for ids in prompt_ids]
        identical, first, prefix = greedy_agreement(ours, theirs)
        del hf_model
        passed = first == len(prompts) and 2 * identical >= len(prompts)
        return passed, (f"{identical} of {len(prompts)} identical over {sizes.max_new_tokens} tokens, first token "
                        f"agrees on {first}, mean common prefix {prefix:.1f} tokens (pass: every first token and at "
                        "least half the sequences; attention kernels differ, so near-ties may split late)")
    check("colocate: greedy generations of vLLM and of the trained model (Hugging Face, server dtype)", generations)

    full_timing = SyncTiming("colocate", "TRL's full sync (`load_weights` of every parameter)")
    full_bytes = sum(p.numel() * p.element_size() for _, p in generation._iter_named_params())
    _time_full_syncs(device, full_sync, full_bytes, sizes.full_syncs, full_timing)
    check("colocate: TRL's own full sync afterwards leaves the same bits (the patches had sent everything)",
          lambda: (lambda c: (c.passed, c.detail()))(compare_runtime_weights(read_runtime_weights(llm), expected,
                                                                              layout)))
    section.timings += [sparse_timing, full_timing]
    section.server_bytes = sum(p.numel() for p in trained.parameters()) * torch.tensor([], dtype=dtype).element_size()
    section.notes.append(f"Full weights in the server dtype: {section.server_bytes / MIB:,.3f} MiB; TRL's full sync "
                         f"hands vLLM the trainer's {_dtype_name(next(trained.parameters()).dtype)} tensors "
                         f"({full_bytes / MIB:,.3f} MiB) and vLLM casts them.")
    weight_sync.remove()
    generation.sync_weights = full_sync
    return section  # the engine goes with this frame: vllm_section releases it


def _release_vllm(dry_run: bool) -> None:
    gc.collect()
    if dry_run:
        return
    try:  # the colocated engine's process groups (vllm/distributed/parallel_state.py)
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception as error:  # cleanup only: report and go on
        print(f"  vLLM cleanup: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    gc.collect()


# ------------------------------------------------------------------------------------------------ server
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_gpu(requested: str | None, original_visible: str | None) -> tuple[str | None, str]:
    """(the GPU for the vLLM server, or None, and why): ``--vllm-server-gpu``, else the second GPU when the user set
    no ``CUDA_VISIBLE_DEVICES`` and ``nvidia-smi -L`` lists at least two."""
    if requested is not None:
        return requested, f"--vllm-server-gpu {requested}"
    if original_visible is not None:
        return None, ("CUDA_VISIBLE_DEVICES was set; pass --vllm-server-gpu N for the server's GPU (another one than "
                      "the trainer's)")
    smi = shutil.which("nvidia-smi")
    count = 0
    if smi:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
        count = sum(line.startswith("GPU ") for line in listing.stdout.splitlines())
    if count < 2:
        return None, (f"{count or 'no'} GPU(s) listed by nvidia-smi: the server needs a second GPU (TRL's client opens "
                      "an NCCL group with the server, and NCCL puts no two ranks of a group on one device); pass "
                      "--vllm-server-gpu N")
    return "1", "the second GPU (nvidia-smi lists several, CUDA_VISIBLE_DEVICES unset)"


def _wait_for_server(process: subprocess.Popen, base_url: str, timeout: float, log: Path) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with code {process.returncode}; its log ({log}) ends with: "
                               + log.read_text(errors="replace")[-2000:])
        try:
            if requests.get(f"{base_url}/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(2)
    raise TimeoutError(f"the vLLM server did not answer /health within {timeout:.0f} s (log: {log})")


def _timed(device, sync: Callable[[], object], weight_sync, timing: SyncTiming) -> Callable[[], None]:
    """``sync`` (the sparse ``sync_weights``) recording its time and the patch it sent in ``timing``."""
    def timed_sync():
        timing.times_ms.append(_wall_ms(device, sync))
        timing.nbytes.append(weight_sync.history[-1]["payload_bytes"])
        timing.anchors.append(weight_sync.history[-1]["anchor"])
    return timed_sync


def _time_full_syncs(device, full_sync: Callable[[], object], nbytes: int, count: int, timing: SyncTiming) -> None:
    for _ in range(count):
        timing.times_ms.append(_wall_ms(device, full_sync))
        timing.nbytes.append(nbytes)
        timing.anchors.append(False)


def server_check(device, sizes: VllmSizes, workdir: Path, gpu: str) -> tuple[list[Check], list[SyncTiming]]:
    """GRPO with ``vllm_mode="server"`` against ``trl vllm-serve`` with the worker extension on ``gpu``."""
    from trl import GRPOTrainer

    from sparse_rl import SparseConfig, sparsify
    from sparse_rl.demo import addition_reward
    from sparse_rl.models import smollm2_checkpoint
    from sparse_rl.sync import WeightSyncConfig, attach_weight_sync
    from sparse_rl.sync.vllm import weight_digests

    port, group_port = _free_port(), _free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = workdir / "vllm-serve.log"
    command = [sys.executable, "-m", "trl.cli.main", "vllm-serve", "--model", str(smollm2_checkpoint()),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
               "--gpu-memory-utilization", "0.5", "--max-model-len", "1024",
               "--worker-extension-cls", "sparse_rl.sync.vllm.SparsePatchWorkerExtension"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu)
    checks: list[Check] = []
    with open(log, "w") as log_file:
        # its own process group: `trl vllm-serve` execs `vllm serve`, which starts engine processes of its own
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_for_server(process, base_url, sizes.server_start_timeout, log)
        model, tokenizer, _ = _policy(device, False, workdir, None)
        train_rows, _ = _dataset(sizes)
        trainer = GRPOTrainer(model=model, reward_funcs=addition_reward, train_dataset=train_rows,
                              processing_class=tokenizer,
                              args=_grpo_args(device, sizes, workdir, use_vllm=True, vllm_mode="server",
                                              vllm_server_base_url=base_url, vllm_group_port=group_port))
        generation = trainer.vllm_generation
        client = generation.vllm_client

        def server_digests() -> dict[str, str]:
            response = client.session.post(f"{base_url}/collective_rpc",
                                           json={"method": "sparse_rl_weight_digests", "args": []})
            response.raise_for_status()
            results = response.json()["results"]
            if len(results) != 1:
                raise RuntimeError(f"{len(results)} workers answered; the check runs with tensor parallelism 1")
            return results[0]

        def expected_digests() -> dict[str, str]:
            trained = trainer.accelerator.unwrap_model(trainer.model)
            return weight_digests((n, p.detach().to(torch.bfloat16)) for n, p in trained.named_parameters())

        def compare(label: str) -> None:
            checks.append(digest_check(label, server_digests(), expected_digests()))
            print(f"  [{'pass' if checks[-1].passed else 'FAIL'}] {label}: {checks[-1].detail}", flush=True)

        compare("server: vLLM's weights as loaded equal the trainer's in bf16 (layout check, digests)")
        start = {n: p.detach().to("cpu", torch.bfloat16) for n, p in model.named_parameters()}
        sparse = sparsify(trainer, SparseConfig(density=DENSITY, discovery="random"))
        mask_path = workdir / "server_mask.safetensors"
        sparse.mask.save(mask_path)
        full_sync = generation.sync_weights  # TRL's own: NCCL broadcast of every parameter
        weight_sync = attach_weight_sync(trainer, sparse, WeightSyncConfig(server_dtype="bfloat16"),
                                         mask_path=str(mask_path))
        sparse_timing = SyncTiming("server", f"sparse patch ({DENSITY:.0%} mask, POST /collective_rpc, base64)")
        generation.sync_weights = _timed(device, generation.sync_weights, weight_sync, sparse_timing)
        trainer.train()
        generation.sync_weights()
        changed = _bf16_changed(trainer.accelerator.unwrap_model(trainer.model), start, torch.bfloat16)
        compare(f"server: after {sizes.grpo_steps} GRPO steps with patches through POST /collective_rpc, vLLM's "
                "weights equal the trainer's in bf16")
        checks[-1].detail += f"; {changed:,} entries moved in training, {len(weight_sync.history)} syncs"
        if changed == 0:
            checks[-1].passed = False
            checks[-1].detail += ": training changed no bf16 entry, the comparison would be vacuous"
        full_timing = SyncTiming("server", "TRL's full sync (NCCL broadcast of every parameter)")
        full_bytes = sum(p.numel() * p.element_size() for _, p in generation._iter_named_params())
        _time_full_syncs(device, full_sync, full_bytes, sizes.full_syncs, full_timing)
        compare("server: TRL's own full sync afterwards leaves the same bits")
        weight_sync.remove()
        timings = [sparse_timing, full_timing]
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)  # the group this function started
            process.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        device.release()
    return checks, timings


# ------------------------------------------------------------------------------------------------ entry point
def vllm_section(device, dry_run: bool, load_tests_module, server_gpu_choice: tuple[str | None, str],
                 sizes: VllmSizes | None = None) -> VllmSection:
    """Section 4: skipped with a clear line when vLLM is missing on a GPU; emulated in the dry run."""
    sizes = sizes or (DRY_VLLM_SIZES if dry_run else GPU_VLLM_SIZES)
    if not dry_run:
        try:
            import vllm  # noqa: F401
        except Exception as error:  # ImportError, or a vLLM that does not load with this torch
            message = " ".join(f"{type(error).__name__}: {error}".split())[:300]
            section = VllmSection(f"vllm not installed (`import vllm` failed: {message})")
            section.notes.append('Nothing of this section ran. `pip install "trl[vllm]"` (TRL 1.16 supports vLLM '
                                 "0.22.0 to 0.31.0) and run `make gpu-check` again.")
            print(f"  vllm not installed (`import vllm` failed: {message}): section skipped", flush=True)
            return section
    with tempfile.TemporaryDirectory(prefix="gpu_check_vllm_") as workdir:
        try:
            section = colocate_check(device, sizes, Path(workdir), dry_run, load_tests_module)
        except Exception as error:  # e.g. vLLM fails to start: reported as a failed row, the server check still runs
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            section = VllmSection("emulated (dry run)" if dry_run else f"vllm {_vllm_version()}")
            section.checks.append(Check("colocate: GRPO with use_vllm=True and the sparse sync", False,
                                        " ".join(f"{type(error).__name__}: {error}".split())[:400]))
        _release_vllm(dry_run)
        device.release()
        gpu, why = server_gpu_choice
        if dry_run:
            section.checks.append(Check("server: `trl vllm-serve` with the worker extension", None,
                                        "skipped: needs vLLM and a GPU (the dry run covers it with "
                                        "tests/test_weight_sync_vllm.py's worker-extension test)"))
        elif gpu is None:
            section.checks.append(Check("server: `trl vllm-serve` with the worker extension", None,
                                        f"skipped: {why}"))
        else:
            try:
                checks, timings = server_check(device, sizes, Path(workdir), gpu)
                section.checks += checks
                section.timings += timings
            except Exception as error:
                print(traceback.format_exc(), file=sys.stderr, flush=True)
                section.checks.append(Check("server: `trl vllm-serve` with the worker extension", False,
                                            " ".join(f"{type(error).__name__}: {error}".split())[:400]))
            section.notes.append(f"Server on GPU {gpu} ({why}).")
    return section


def render(section: VllmSection, sizes: VllmSizes) -> list[str]:
    lines = [f"- vLLM: {section.available}", ""]
    lines += [f"- {note}" for note in section.notes] + ([""] if section.notes else [])
    if section.checks:
        lines += ["| check | result | detail |", "|---|---|---|"]
        result = {True: "pass", False: "**FAIL**", None: "skipped"}
        lines += [f"| {c.name} | {result[c.passed]} | {c.detail.replace('|', '/')} |" for c in section.checks]
        lines.append("")
    if section.timings:
        lines += [f"Per sync, device synchronised at both ends; TRL's full sync (the method TRL wrote) timed "
                  f"{sizes.full_syncs} times after training in the same process, against each mode's own.", "",
                  "| sync | syncs | median ms | time vs TRL full | median MiB sent | bytes vs TRL full "
                  "| bytes vs full weights in server dtype | anchor MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for timing in section.timings:
            full = next(t for t in section.timings if t.mode == timing.mode and t.label.startswith("TRL"))
            full_ms = statistics.median(full.times_ms) if full.times_ms else float("nan")
            full_bytes = statistics.mean(full.nbytes) if full.nbytes else float("nan")
            patches = [(t, b) for t, b, a in zip(timing.times_ms, timing.nbytes, timing.anchors) if not a] or \
                list(zip(timing.times_ms, timing.nbytes))
            anchors = [b for b, a in zip(timing.nbytes, timing.anchors) if a]
            ms = statistics.median(t for t, _ in patches) if patches else float("nan")
            nbytes = statistics.median(b for _, b in patches) if patches else float("nan")
            lines.append(f"| {timing.mode}: {timing.label} | {len(timing.times_ms)} | {ms:.2f} | {ms / full_ms:.3f}x | "
                         f"{nbytes / MIB:.4f} | {nbytes / full_bytes:.4f}x | {nbytes / section.server_bytes:.4f}x | "
                         f"{(anchors[0] / MIB) if anchors else float('nan'):.4f} |")
        lines += ["", "Sparse rows: the median over the patches after the first (anchor) sync; the anchor's size on "
                  "its own.", ""]
    return lines
