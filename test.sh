#!/usr/bin/env bash
# Set everything up, then run the test suite. Extra arguments go to pytest.
# The tests run in CONEF_TEST_WORKERS pytest-xdist workers (default 2, one per
# core here; 0 runs them in this process). Each test file runs whole on one
# worker (--dist loadfile --no-loadscope-reorder), so a module-scoped fixture (a deployment, a DDP
# world) is built once; files are handed out in collection order, so the slow
# end-to-end files of tests/apps start first and the short ones fill the end.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n "${CONEF_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
