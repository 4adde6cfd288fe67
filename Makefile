# The two commands of the README: `make demo` and `make test`. Both do their own set-up.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-latest lint bench gpu-check gpu-check-dry clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh scripts/venv_with_torch.sh
	VENV=$(VENV) bash scripts/setup.sh

demo: setup
	$(VENV)/bin/sparse-rl demo

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# TRL-facing tests against the newest trl/transformers/accelerate on PyPI, in their own venv (not part of CI)
test-latest:
	OMP_NUM_THREADS=1 VENV=.venv-latest bash scripts/test_latest.sh

lint: setup
	$(VENV)/bin/ruff check sparse_rl kernels benchmarks tests

bench: setup
	TRITON_INTERPRET=1 $(PY) benchmarks/bench_optimizer_step.py

# On a CUDA machine: kernel/optimizer checks on the device, optimizer step on 1B shapes, GRPO on SmolLM2-135M, and
# (with vLLM installed) the sparse weight sync into vLLM under GRPO with use_vllm=True, checked bit for bit;
# writes benchmarks/results/gpu_check.md. `make gpu-check ARGS=--dry-run` (or gpu-check-dry) runs it on CPU, tiny.
gpu-check: setup
	$(PY) benchmarks/gpu_check.py $(ARGS)

gpu-check-dry: setup
	$(PY) benchmarks/gpu_check.py --dry-run $(ARGS)

clean:
	rm -rf $(VENV) .venv-latest build *.egg-info
