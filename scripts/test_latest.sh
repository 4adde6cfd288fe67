#!/usr/bin/env bash
# Run the TRL-facing tests against the newest trl, transformers and accelerate on PyPI, ignoring the upper bounds
# pyproject.toml declares (the tested range). A separate virtual environment (.venv-latest) keeps the main one
# untouched. Usage: `make test-latest`, or `VENV=... bash scripts/test_latest.sh [pytest arguments]`;
# SETUP_ONLY=1 stops after the installation.
set -euo pipefail
VENV="${VENV:-.venv-latest}"
VENV="$VENV" bash "$(dirname "$0")/venv_with_torch.sh"
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --no-deps -e .
# sparse-rl's own requirements (dev extra included) with trl/transformers/accelerate unbounded and torch kept as
# installed above, then the newest releases of the three
"$VENV/bin/python" - "$VENV/requirements-latest.txt" <<'PY'
import re
import sys
from importlib.metadata import requires

import torch

unbounded = {"trl", "transformers", "accelerate"}
with open(sys.argv[1], "w") as out:
    for requirement in requires("sparse-rl"):
        spec, _, marker = requirement.partition(";")
        if "extra" in marker and '"dev"' not in marker:
            continue
        marker = re.sub(r'(and )?extra == "dev"( and)?', "", marker).strip()
        name = re.match(r"[A-Za-z0-9_.-]+", spec).group()
        if name == "torch":
            spec = f"torch=={torch.__version__}"
        elif name.lower() in unbounded:
            spec = name
        out.write(spec.strip() + (f"; {marker}" if marker else "") + "\n")
PY
$PIP install --quiet --upgrade --upgrade-strategy only-if-needed -r "$VENV/requirements-latest.txt" \
  trl transformers accelerate
"$VENV/bin/python" -c "import trl, transformers, accelerate, torch; print(f'testing trl {trl.__version__}, \
transformers {transformers.__version__}, accelerate {accelerate.__version__}, torch {torch.__version__}')"
[ "${SETUP_ONLY:-0}" = 1 ] && exit 0
TESTS=(tests/test_compat.py tests/test_trl_grpo.py tests/test_trl_trainers.py tests/test_trl_refusals.py
       tests/test_entropy.py tests/test_reference.py tests/test_resume.py tests/test_sparse_config.py
       tests/test_compact_grad.py tests/test_discovery_probe.py tests/test_delta.py tests/test_public_api.py)
if [ "$#" -gt 0 ]; then TESTS=("$@"); fi
TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
