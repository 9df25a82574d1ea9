#!/usr/bin/env bash
# The one prepared script for a GPU machine (DESIGN.md): build, GPU tests, benchmarks, results into the
# folder given as $1. Budget: under 8 minutes on one H200. Usage: bash benchmarks/gpu_check.sh "$OUT"
set -uo pipefail
OUT="${1:?usage: gpu_check.sh OUT_DIR}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MMKERN_BENCH_DIR="$OUT" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
log="$OUT/gpu_check.log"
step() { echo "== $* ($(date +%T))" | tee -a "$log"; }

step build
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$log"
MMKERN_CUDA_ARCHS="${MMKERN_CUDA_ARCHS:-90a}" timeout 240 python3 setup.py build_ext --inplace -q >>"$log" 2>&1 \
  || { echo "build failed" | tee -a "$log"; exit 1; }
python3 -m mmkern info | tee -a "$log"

step "GPU tests"
timeout 180 python3 -m pytest tests -q -x -m "not slow" -k "not distributed and not demo and not train" \
  -p no:cacheprovider 2>&1 | tail -40 | tee -a "$log"

for op in patch_embed attention contrastive models native_resolution; do
  [ -f "benchmarks/bench_$op.py" ] || continue
  step "bench $op"
  timeout 90 python3 -m "benchmarks.bench_$op" 2>&1 | tail -40 | tee -a "$log"
done
step done
