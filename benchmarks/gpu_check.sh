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
# The GPU image brings its own torch and triton: use the first Python whose torch sees a GPU ($PYTHON,
# python3, then the CPU .venv), else one that has torch at all, which then says there is no GPU.
has_cuda() { "$1" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; }
has_torch() { "$1" -c 'import torch' 2>/dev/null; }
PY=""
for candidate in ${PYTHON:-} python3 .venv/bin/python; do
  if command -v "$candidate" >/dev/null 2>&1 && has_cuda "$candidate"; then PY=$candidate; break; fi
done
if [ -z "$PY" ]; then
  for candidate in ${PYTHON:-} python3 .venv/bin/python; do
    if command -v "$candidate" >/dev/null 2>&1 && has_torch "$candidate"; then PY=$candidate; break; fi
  done
fi
PY=${PY:-python3}
# Liger-Kernel is pure Python over Triton: if the GPU image lacks it but the CPU venv's copy came along
# (carry .venv/lib/python3.11/site-packages/liger_kernel), put that one package, and nothing else of
# the CPU venv, on the path.
if ! "$PY" -c 'import liger_kernel' 2>/dev/null; then
  LIGER=$(ls -d "$PWD"/.venv/lib/python3*/site-packages/liger_kernel 2>/dev/null | head -n 1 || true)
  if [ -n "$LIGER" ]; then
    SHIM=$(mktemp -d)
    ln -s "$LIGER" "$SHIM/liger_kernel"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
# The script stops starting new work after --budget-s; timeout is the hard stop behind it.
timeout 295 "$PY" benchmarks/gpu_check.py --out "$OUT" --budget-s "${BUDGET_S:-270}" "$@" 2>&1 | tee "$OUT/gpu_check.log"
