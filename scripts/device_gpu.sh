#!/usr/bin/env bash
# Everything GPU-side in one device call: install the carried wheels, run the GPU tests, run the
# benchmarks asked for, and write JUnit XML, JSON and logs under $OUT.
#   scripts/device_gpu.sh [bench ...]      bench: step | step-quick | none
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" \
  ${GPU_TESTS:-tests/test_attention.py tests/test_lora_ops.py tests/test_engine_gpu.py} \
  2>&1 | tee "$OUT/gpu-tests.log" | tail -40
for b in "${@:-step}"; do
  case "$b" in
    step) python3 -m benchmarks.step_bench --out "$OUT/step.json" 2>&1 | tee "$OUT/step.log" | tail -12 ;;
    step-quick) python3 -m benchmarks.step_bench --quick --out "$OUT/step.json" 2>&1 | tail -12 ;;
    none) ;;
  esac
done
