#!/usr/bin/env bash
# Set everything up, then run the main job: the default federated simulation
# (100 virtual clients, 10 % per round, ConEF with a count sketch). Extra
# arguments go to `python -m sim.run` (see `--help`).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python -m sim.run "$@"
