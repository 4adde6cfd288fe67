#!/usr/bin/env bash
# Run the TRL-facing tests against the newest trl, transformers and accelerate on PyPI, ignoring the upper bounds
# pyproject.toml declares (the tested range). A separate virtual environment (.venv-latest) keeps the main one
# untouched. Usage: `make test-latest` (or VENV=... bash scripts/test_latest.sh [pytest arguments]).
set -euo pipefail
VENV="${VENV:-.venv-latest}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # CPU torch first (as scripts/setup.sh does), so resolving trl/transformers never pulls a CUDA build
  $PIP install --quiet "torch==2.13.0" 2>/dev/null \
    || $PIP install --quiet "torch>=2.6" --index-url https://download.pytorch.org/whl/cpu
fi
# pyproject's dependencies and dev extras, with trl/transformers/accelerate unbounded, upgraded to the newest release
# (torch stays the CPU build installed above)
"$VENV/bin/python" - "$VENV/requirements-latest.txt" <<'PY'
import re
import sys
import tomllib

import torch

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
unbounded = {"trl", "transformers", "accelerate"}
with open(sys.argv[1], "w") as out:
    for requirement in project["dependencies"] + project["optional-dependencies"]["dev"]:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group()
        if name == "torch":
            requirement = f"torch=={torch.__version__}"
        out.write((name if name.lower() in unbounded else requirement) + "\n")
PY
$PIP install --quiet --upgrade --upgrade-strategy only-if-needed -r "$VENV/requirements-latest.txt" \
  trl transformers accelerate
$PIP install --quiet --no-deps -e .
"$VENV/bin/python" -c "import trl, transformers, accelerate, torch; print(f'testing trl {trl.__version__}, \
transformers {transformers.__version__}, accelerate {accelerate.__version__}, torch {torch.__version__}')"
[ "${SETUP_ONLY:-0}" = 1 ] && exit 0
TESTS=(tests/test_compat.py tests/test_trl_grpo.py tests/test_trl_trainers.py tests/test_trl_refusals.py
       tests/test_entropy.py tests/test_reference.py tests/test_resume.py tests/test_sparse_config.py
       tests/test_compact_grad.py tests/test_discovery_probe.py tests/test_delta.py tests/test_public_api.py)
if [ "$#" -gt 0 ]; then TESTS=("$@"); fi
TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
