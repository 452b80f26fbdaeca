#!/usr/bin/env bash
# Set everything up, then run the test suite. Extra arguments go to pytest.
# The tests run in CONEF_TEST_WORKERS pytest-xdist workers (default 2, one per
# core here; 0 runs them in this process); idle workers steal queued tests.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n "${CONEF_TEST_WORKERS:-2}" --dist worksteal "$@"
