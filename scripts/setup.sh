#!/usr/bin/env bash
# Installs moeflow and everything it needs into ./.venv (idempotent). Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_CONSTRAINT="$PWD/constraints.txt"
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, on its own, so nothing that depends on it can pick a CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
