#!/usr/bin/env bash
# The device call of 2026-11-29's second run: GPU tests, the step benchmark with LoRA, and the
# HF PEFT baseline next to our engine. Each part has its own time limit so all report back.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
GPU_TESTS="tests/test_engine_gpu.py tests/test_graphs_gpu.py" timeout 170 bash scripts/device_gpu.sh none
timeout 220 python3 -m benchmarks.step_bench --lora --steps 30 --out "$OUT/step_lora.json" > "$OUT/step_lora.log" 2>&1
tail -14 "$OUT/step_lora.log"
timeout 200 python3 -m benchmarks.hf_baseline --dummy-shape llama-3.1-8b --num-adapters 8 --rank 16 \
  --batch 32 --prompt-len 128 --new-tokens 64 --reps 1 --variants mixed --compare-engine \
  --out "$OUT/hf_baseline.json" > "$OUT/hf_baseline.log" 2>&1
tail -12 "$OUT/hf_baseline.log"
