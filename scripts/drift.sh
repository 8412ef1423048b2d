#!/usr/bin/env bash
# Reports drift: installs the newest release of every dependency (torch stays the pinned CPU build)
# into ./.venv-drift, lists what differs from constraints.txt, and runs the whole suite there.
# Not part of CI: a red result here says which pin to move next, it never breaks the build.
# Usage: bash scripts/drift.sh [pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-drift/bin/python ] || "$PY" -m venv .venv-drift
printf 'torch==2.13.0\n' > .venv-drift/torch-only.txt
export PIP_CONSTRAINT="$PWD/.venv-drift/torch-only.txt"
.venv-drift/bin/python -m pip install --quiet --upgrade pip
.venv-drift/bin/python -m pip install --quiet "torch==2.13.0"
.venv-drift/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]"
echo "== versions that differ from constraints.txt (pinned -> newest)"
.venv-drift/bin/python - <<'PY'
import re, subprocess, sys
pin = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", open("constraints.txt").read(), re.M))
now = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
for name, ver in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", now, re.M):
    old = {k.lower(): v for k, v in pin.items()}.get(name.lower())
    if old is not None and old != ver.split("+")[0]:
        print(f"  {name}: {old} -> {ver}")
PY
echo "== the suite on the newest versions"
.venv-drift/bin/python -m pytest -m "slow or not slow" -q "$@"
status=$?
echo "== drift check finished with pytest status $status (informational; CI uses constraints.txt)"
exit 0
