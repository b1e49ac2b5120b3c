#!/usr/bin/env bash
# Set up a virtual environment with the test extra and run the test suite (CPU).
#   scripts/test.sh [VENV_DIR] [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
shift || true
bash scripts/setup.sh "$venv" --test
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
exec "$venv/bin/python" -m pytest -q -ra "$@"
