#!/usr/bin/env bash
# Create the virtual environment $VENV (if missing) with an up-to-date pip and torch. On a machine without a GPU,
# torch is pinned to the CPU build first, so that resolving trl/transformers never pulls a multi-GB CUDA build.
# Used by scripts/setup.sh (.venv) and scripts/test_latest.sh (.venv-latest).
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
