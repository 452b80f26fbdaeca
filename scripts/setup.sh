#!/usr/bin/env bash
# Create .venv (if needed) and install conef-fl with its dependencies.
# Idempotent: re-installs only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${CONEF_VENV:-.venv}
stamp="$VENV/.conef-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import conef_fl, torch, flwr" 2>/dev/null; then
  exit 0
fi
echo "[setup] creating $VENV and installing dependencies (first run takes a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned: on these machines pip finds the CPU build of 2.13.0 locally;
# an unpinned torch would pull several GB of CUDA packages. GPU users: install your
# CUDA build of torch>=2.2 before running this script and it is kept.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "torch==${CONEF_TORCH_VERSION:-2.13.0}"
fi
"$VENV/bin/python" -m pip install -q -e ".[dev]"
echo "$want" > "$stamp"
