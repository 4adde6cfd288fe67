"""``benchmarks/gpu_check.py`` (``make gpu-check``): its dry run writes every row of the report, so the GPU script
cannot rot on machines without a GPU, and without CUDA the real run refuses with its own exit code."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
DENSITIES = ("1%", "5%", "10%", "30%")
MASKED_PROVIDERS = ("MaskedAdamW fp32, compact gradients", "MaskedAdamW fp32, dense gradients",
                    "MaskedAdamW fp32, 8-bit state, compact gradients",
                    "MaskedAdamW bf16 + fp32 master, compact gradients")


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)  # the script sets it (dry run) or clears it (GPU run) itself
    # run from another folder: the script must not depend on the working directory
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


def _table(report: str, heading: str) -> list[dict[str, str]]:
    """Rows of the first markdown table after ``heading``, as dicts keyed by the header cells."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]
    header = cells(lines[first])
    rows = []
    for line in lines[first + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, cells(line))))
    return rows


def _number(text: str) -> float:
    return float(text.rstrip("x").replace(",", "").split()[0])


def test_dry_run_writes_every_row(tmp_path):
    output = tmp_path / "report.md"
    done = _run(["--dry-run", "--output", str(output)], tmp_path, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    report = output.read_text()
    assert "- Device: CPU dry run" in report and "triton " in report and "torch " in report
    assert "## Errors" not in report

    checks = _table(report, "## 1.")
    names = [row["check"] for row in checks]
    assert len(checks) >= 27 and all(row["result"] == "pass" for row in checks), checks
    for expected in ("bit-exact vs reference: float32, dense gradients",
                     "bit-exact vs reference: bfloat16, master copy, compact gradients",
                     "bit-exact vs reference: float16, compact gradients",
                     "bit-exact vs reference: random sizes and densities",
                     "stochastic rounding vs CPU path: bfloat16, dense gradients",
                     "8-bit state vs CPU path: bfloat16, master copy, compact gradients",
                     "MaskedAdamW vs torch.optim.AdamW on the selected entries",
                     "state_dict round trip on the device: bf16, 8-bit state"):
        assert expected in names
    for row in checks:  # the comparisons are not vacuous: selected entries moved
        if row["check"].startswith(("bit-exact vs reference: float", "bit-exact vs reference: bfloat")):
            assert _number(row["detail"].split(", ")[-1].split(" moved")[0].split()[-1]) > 0, row

    steps = _table(report, "## 2.")
    by_key = {(row["optimizer"], row["density"]): row for row in steps}
    for provider in ("torch AdamW fused, fp32", "torch AdamW fused, bf16 (bf16 moments)"):
        assert (provider, "dense") in by_key
    if "bitsandbytes not installed" not in report:
        assert ("bitsandbytes AdamW8bit, fp32 weights", "dense") in by_key
    assert _number(by_key["torch AdamW fused, fp32", "dense"]["B moved / param"]) == 28.0
    for provider in MASKED_PROVIDERS:
        moved = []
        for density in DENSITIES:
            row = by_key[provider, density]
            assert math.isfinite(_number(row["step (ms)"])) and _number(row["step (ms)"]) > 0
            assert _number(row["GB/s"]) >= 0 and _number(row["of copy"]) >= 0
            moved.append(_number(row["B moved / param"]))
        assert moved == sorted(moved) and moved[-1] < 28.0, (provider, moved)  # more density, more traffic

    grpo = {row["setup"]: row for row in _table(report, "## 3.")}
    assert set(grpo) == {"full", "sparse 10%", "LoRA"}
    share = {setup: float(row["trained entries"].split("(")[1].rstrip("%)")) for setup, row in grpo.items()}
    assert share["full"] == 100.0 and 9.5 < share["sparse 10%"] < 10.5 and 5 < share["LoRA"] < 15
    for row in grpo.values():
        assert _number(row["peak in train() (MiB)"]) > 0 and _number(row["step (s)"]) > 0
        assert 0.0 <= _number(row["mean reward"]) <= 1.0
    changed = {setup: _number(row["bf16 entries changed"]) for setup, row in grpo.items()}
    assert changed["full"] > 0 and changed["sparse 10%"] > 0 and changed["LoRA"] == 0  # training moved the weights
    assert grpo["sparse 10%"]["bf16 entries changed"].endswith("outside the mask: 0")

    assert "- vLLM: emulated (dry run)" in report
    vllm = {row["check"]: row for row in _table(report, "## 4.")}
    colocate = [row for name, row in vllm.items() if name.startswith("colocate:")]
    assert len(colocate) == 5 and all(row["result"] == "pass" for row in colocate), colocate
    after = next(row for name, row in vllm.items() if name.startswith("colocate: after 2 GRPO steps"))
    moved = int(after["detail"].split(" entries moved")[0].split()[-1].replace(",", ""))
    assert moved > 0 and "equal bit for bit" in after["detail"] and "3 syncs (1 anchor)" in after["detail"]
    flipped = vllm["colocate: the read-back comparison catches one flipped bit"]["detail"]
    assert "k_proj.weight: 1 entries differ" in flipped
    assert vllm["server: `trl vllm-serve` with the worker extension"]["result"] == "skipped"
    syncs = {row["sync"].split(" (")[0]: row for row in _table(report, "| sync |")}
    sparse, full = syncs["colocate: sparse patch"], syncs["colocate: TRL's full sync"]
    assert _number(sparse["syncs"]) == 3 and _number(full["syncs"]) == 2
    assert 0 < _number(sparse["bytes vs TRL full"]) < 1 and _number(sparse["median ms"]) > 0
    assert _number(full["bytes vs full weights in server dtype"]) == 2.0  # fp32 tensors sent, bf16 held


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the script would run")
def test_without_cuda_it_says_so_and_exits_nonzero(tmp_path):
    output = tmp_path / "report.md"
    done = _run(["--output", str(output)], tmp_path, timeout=600)
    assert done.returncode == 3, (done.returncode, done.stderr[-2000:])
    assert "no CUDA device is available" in done.stderr and "--dry-run" in done.stderr
    assert not output.exists()


def test_device_check_fails_when_the_kernel_disagrees_with_the_reference(tmp_path):
    """The bit-exact comparison is not vacuous: against a reference off by one fp32 rounding of eps it fails, naming
    the tensor, and against the real reference it passes (run in a child: the script sets TRITON_INTERPRET itself)."""
    code = f"""
import sys
sys.argv = ["gpu_check.py", "--dry-run"]
sys.path.insert(0, {str(SCRIPT.parent)!r})
import torch
import gpu_check

ref = gpu_check._load_tests_module("test_optim_reference")
device = gpu_check.Device(dry_run=True)
params, mask = ref.random_problem({{"w": (37, 50), "v": (1500,)}}, 0.3, torch.bfloat16)
grads = ref.random_grads(params, 2)
print("moved", gpu_check._against_reference(ref, device, params, mask, grads, compact=True))

class OffByEps(ref.ReferenceMaskedAdamW):
    def __init__(self, *args, eps, **kwargs):
        super().__init__(*args, eps=eps * 1.5, **kwargs)

ref.ReferenceMaskedAdamW = OffByEps
try:
    gpu_check._against_reference(ref, device, params, mask, grads, compact=True)
except AssertionError as error:
    print("caught", error)
"""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert int(next(line for line in lines if line.startswith("moved")).split()[1]) > 0
    caught = next((line for line in lines if line.startswith("caught")), "")
    # bf16 rounding hides some of it in the weights; the fp32 master copy shows it
    assert "entries differ" in caught and re.search(r"(param|of) [wv]:", caught), done.stdout[-2000:]


def test_a_failing_setup_is_reported_and_exits_1(tmp_path):
    """A section part that raises is named in the report's Errors with its traceback, and the run exits 1."""
    output = tmp_path / "report.md"
    code = f"""
import sys
sys.argv = ["gpu_check.py", "--dry-run", "--sections", "grpo", "--output", {str(output)!r}]
sys.path.insert(0, {str(SCRIPT.parent)!r})
import gpu_check

def grpo_run(device, sizes, setup, workdir):
    raise RuntimeError(f"no GPU memory left for {{setup}}")

gpu_check.grpo_run = grpo_run
sys.exit(gpu_check.main())
"""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    report = output.read_text()
    for setup in ("full", "sparse 10%", "LoRA"):
        assert f"`grpo: {setup}` raised" in report and f"no GPU memory left for {setup}" in report


# ------------------------------------------------------------------------------------------------ section 4 (vLLM)
def _gpu_check_vllm():
    import importlib.util

    if "_test_gpu_check_vllm" not in sys.modules:  # dataclasses look their module up in sys.modules
        spec = importlib.util.spec_from_file_location("_test_gpu_check_vllm", SCRIPT.parent / "gpu_check_vllm.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["_test_gpu_check_vllm"]


def _load_tests_module(name: str):
    import importlib

    return importlib.import_module(f"tests.{name}")


_CPU = SimpleNamespace(torch=torch.device("cpu"), is_cuda=False, sync=lambda: None, release=lambda: None)


def test_vllm_read_back_comparison_catches_corrupted_weights():
    """The comparison of section 4 runs on what ``LLM.apply_model`` returns (here the emulated engine's): equal weights
    pass, and one changed entry in a fused shard, a missing tensor or a fused parameter of the wrong size fail,
    naming the Hugging Face tensor."""
    from sparse_rl.sync.vllm import FusedLayout
    from tests.tiny import make_tiny_model
    from tests.vllm_emulation import FakeLLM

    check = _gpu_check_vllm()
    model = make_tiny_model(attention_bias=True)
    expected = {n: p.detach().to(torch.bfloat16) for n, p in model.named_parameters()}
    layout = FusedLayout.from_config(model.config)
    llm = FakeLLM(model)
    comparison = check.compare_runtime_weights(check.read_runtime_weights(llm), expected, layout)
    assert comparison.passed and comparison.tensors == len(expected), comparison.differing
    assert comparison.entries == sum(t.numel() for t in expected.values())

    with torch.no_grad():  # corrupt the live engine's weights: the up_proj half of gate_up_proj, one entry
        fused = llm.model.get_parameter("model.layers.1.mlp.gate_up_proj.weight")
        fused.view(-1)[fused.numel() - 7] += 1.0
    comparison = check.compare_runtime_weights(check.read_runtime_weights(llm), expected, layout)
    assert not comparison.passed
    assert len(comparison.differing) == 1 and comparison.differing[0].startswith(
        "model.layers.1.mlp.up_proj.weight: 1 entries differ"), comparison.differing
    assert "model.layers.1.mlp.up_proj.weight" in comparison.detail()

    runtime = check.read_runtime_weights(FakeLLM(model))
    flipped = check.flip_one_bit(runtime, layout, "model.layers.0.self_attn.v_proj.bias")
    assert [line.split(":")[0] for line in check.compare_runtime_weights(flipped, expected, layout).differing] == [
        "model.layers.0.self_attn.v_proj.bias"]
    assert check.compare_runtime_weights(runtime, expected, layout).passed  # flip_one_bit corrupted a copy only

    missing = {n: t for n, t in runtime.items() if n != "model.norm.weight"}
    assert check.compare_runtime_weights(missing, expected, layout).differing == [
        "model.norm.weight: not in vLLM's parameters"]
    extra = {**runtime, "model.layers.0.self_attn.attn.k_scale": torch.ones(())}  # listed, not synced, not failed
    comparison = check.compare_runtime_weights(extra, expected, layout)
    assert comparison.passed and "vLLM-only parameters: model.layers.0.self_attn.attn.k_scale" in comparison.detail()
    short = dict(runtime)
    short["model.layers.0.self_attn.qkv_proj.weight"] = runtime["model.layers.0.self_attn.qkv_proj.weight"][:-2]
    problems = check.compare_runtime_weights(short, expected, layout).differing
    assert any("qkv_proj.weight: shape" in line for line in problems), problems


def test_vllm_section_fails_when_the_sync_drops_an_entry(tmp_path, monkeypatch):
    """Section 4's end-to-end check fails if the patches do not reach vLLM whole: with a writer that drops the last
    index of every fused patch, the after-training comparison reports the trainer's and vLLM's weights as different
    (and passes with the real writer, in the dry-run test above)."""
    from sparse_rl.sync import vllm as sync_vllm

    real_runtime_patches = sync_vllm.runtime_patches

    def dropping(checked, layout):
        return [(name, indices[:-1], values[:-1]) for name, indices, values in real_runtime_patches(checked, layout)]

    monkeypatch.setattr(sync_vllm, "runtime_patches", dropping)
    check = _gpu_check_vllm()
    section = check.colocate_check(_CPU, check.DRY_VLLM_SIZES, tmp_path, True, _load_tests_module)
    passed = {c.name.split(":")[1].split()[0]: c.passed for c in section.checks}
    after = next(c for c in section.checks if c.name.startswith("colocate: after 2 GRPO steps"))
    assert after.passed is False and "entries differ" in after.detail, after
    assert passed["vLLM's"] and passed["the"] and passed["TRL's"]  # as loaded, flipped bit, after a full sync
    assert after.name in section.failed


def test_vllm_section_without_vllm_says_so_and_fails_nothing(monkeypatch):
    """On a GPU run without vLLM, section 4 is one clear line, no failed check, and nothing else runs."""
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    check = _gpu_check_vllm()

    def must_not_run(*args, **kwargs):
        raise AssertionError("the colocate check ran without vLLM")

    monkeypatch.setattr(check, "colocate_check", must_not_run)
    section = check.vllm_section(_CPU, False, _load_tests_module, (None, "no second GPU"))
    assert section.available.startswith("vllm not installed (`import vllm` failed: ") and section.failed == []
    lines = check.render(section, check.GPU_VLLM_SIZES)
    assert lines[0].startswith("- vLLM: vllm not installed") and not any(line.startswith("|") for line in lines)


def test_vllm_server_check_parts_that_run_without_a_server(tmp_path):
    """The server-mode check's digest comparison (fed by the worker extension over the emulated engine), its choice
    of GPU, and its wait for the server, which reports a server that died with the end of its log."""
    from sparse_rl.sync.vllm import SparsePatchWorkerExtension, weight_digests
    from tests.tiny import make_tiny_model
    from tests.vllm_emulation import as_module, emulated_runtime_tensors

    check = _gpu_check_vllm()
    model = make_tiny_model()
    worker = SparsePatchWorkerExtension()
    worker.model_runner = SimpleNamespace(model=as_module(emulated_runtime_tensors(model)),
                                          model_config=SimpleNamespace(hf_config=model.config))
    trainer = weight_digests((n, p.detach().to(torch.bfloat16)) for n, p in model.named_parameters())
    assert check.digest_check("x", worker.sparse_rl_weight_digests(), trainer).passed
    with torch.no_grad():
        worker.model_runner.model.get_parameter("model.layers.0.mlp.gate_up_proj.weight").view(-1)[0] += 1
    failed = check.digest_check("x", worker.sparse_rl_weight_digests(), trainer)
    assert not failed.passed and failed.detail.endswith("model.layers.0.mlp.gate_proj.weight")
    assert not check.digest_check("x", {}, trainer).passed

    assert check.server_gpu("3", None) == ("3", "--vllm-server-gpu 3")
    gpu, why = check.server_gpu(None, "0")
    assert gpu is None and "--vllm-server-gpu" in why

    log = tmp_path / "server.log"
    log.write_text("address already in use\n")
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(4)"])
    dead.wait()
    with pytest.raises(RuntimeError, match="exited with code 4.*address already in use"):
        check._wait_for_server(dead, "http://127.0.0.1:9", 30, log)
