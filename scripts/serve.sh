#!/usr/bin/env bash
# Set up a virtual environment and serve the embedded default (server.toml: the bundled
# SmolLM2-135M-Instruct with two demo adapters). Extra flags override server.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh .venv
exec .venv/bin/python -m runtime --config server.toml "$@"
