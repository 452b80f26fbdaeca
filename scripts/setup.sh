#!/usr/bin/env bash
# Create .venv (if needed) and install conef-fl with its dependencies.
# Idempotent: re-installs only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${CONEF_VENV:-.venv}
stamp="$VENV/.conef-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

# The optional compiled kernels (conef_fl/native): built once per kernel source and torch, with the
# system's C++ compiler; a failed build is only a warning (the pure-torch fallback gives the same
# results) and is not retried until `python -m conef_fl.native build --force`. CONEF_NATIVE=0 skips it.
build_native() {
  if [ "${CONEF_NATIVE:-1}" = "0" ]; then return 0; fi
  echo "[setup] building the native kernels (conef_fl/native, about 20-60 s)" >&2
  "$VENV/bin/python" -m conef_fl.native build \
    || echo "[setup] warning: native kernels not built; the pure-torch fallback is used" >&2
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  rc=0
  "$VENV/bin/python" -c "import conef_fl, torch, flwr; from conef_fl import native
raise SystemExit(0 if native.build_attempted() else 3)" 2>/dev/null || rc=$?
  if [ "$rc" = "0" ]; then exit 0; fi
  if [ "$rc" = "3" ]; then build_native; exit 0; fi
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
build_native
echo "$want" > "$stamp"
