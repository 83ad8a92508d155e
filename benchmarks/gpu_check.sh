#!/usr/bin/env bash
# One command on a CUDA machine, under 5 minutes on an H100/H200: every kernel path against float64 in fp32
# and bf16 at real shapes, the bf16 GEMM rate, then the benchmark table and the fraction of the GEMM floor.
# Results go to $OUT (default benchmarks/report/gpu): gpu_check.md, gpu_check.json, report.md, results.json,
# gpu_check.log, nvidia-smi.txt. Exit status 1 when a correctness case fails.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/report/gpu}"
mkdir -p "$OUT"
export OUT
# The GPU image brings its own torch and triton; the CPU .venv is used only if it can see a GPU.
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ] && .venv/bin/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  PY=.venv/bin/python
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
# The script stops starting new work after --budget-s; timeout is the hard stop behind it.
timeout 295 "$PY" benchmarks/gpu_check.py --out "$OUT" --budget-s "${BUDGET_S:-270}" "$@" 2>&1 | tee "$OUT/gpu_check.log"
