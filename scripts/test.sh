#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and runs the whole test suite, slow and multi-process tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest -m "slow or not slow" -q "$@"
