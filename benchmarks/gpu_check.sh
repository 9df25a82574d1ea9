#!/usr/bin/env bash
# The one prepared script for a GPU machine (DESIGN.md): build, GPU tests, the Triton compile report for the
# device, benchmarks; results and a log into the folder given as $1. Budget: under 8 minutes on one H200.
# It assumes only what that machine has: python3 with torch and triton (3.6 there), nvcc maybe, no network and
# nothing to install. A missing piece (pybind11 or nvcc for the native build, pytest / hypothesis for the tests)
# is logged and its step skipped; the other steps still run.
# Usage: bash benchmarks/gpu_check.sh "$OUT"
set -uo pipefail
OUT="${1:?usage: gpu_check.sh OUT_DIR}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MMKERN_BENCH_DIR="$OUT" PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=1  # silences triton 3.9's notice; the default it names is what runs
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"
log="$OUT/gpu_check.log"
start=$SECONDS
step() { echo "== $* ($(date +%T), ${SECONDS}s)" | tee -a "$log"; }
has() { "$PY" -c "import $1" 2>/dev/null; }

step versions
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$log"
"$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, 'device', torch.cuda.get_device_name(0))" 2>&1 | tee -a "$log"
cc=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(0); print(a * 10 + b)" 2>/dev/null || echo 90)

step build
if has pybind11; then
  arch="${MMKERN_CUDA_ARCHS:-$([ "$cc" = 90 ] && echo 90a || echo "$cc")}"
  MMKERN_CUDA_ARCHS="$arch" timeout 150 "$PY" setup.py build_ext --inplace -q >>"$OUT/build.log" 2>&1 \
    && echo "built mmkern._C (archs $arch)" | tee -a "$log" \
    || echo "native build failed (see build.log): the cpu / cuda backends are skipped" | tee -a "$log"
else
  echo "no pybind11: native module not built, the cpu / cuda backends are skipped" | tee -a "$log"
fi
"$PY" -m mmkern info 2>&1 | tee -a "$log"

step "GPU tests"
if has pytest && has hypothesis; then
  timeout 120 "$PY" -m pytest -q -p no:cacheprovider -k "gpu or cuda or override" \
    tests/test_attention.py tests/test_attention_vs_torch.py tests/test_fused.py tests/test_rms_norm.py tests/test_contrastive.py \
    tests/test_patch_embed.py tests/test_patch_embed_packed.py tests/test_backends.py 2>&1 | tail -30 | tee -a "$log"
else
  echo "pytest / hypothesis missing: tests skipped" | tee -a "$log"
fi

step "Triton compile report (sm_$cc, first config of each variant)"
timeout 90 "$PY" -m benchmarks.triton_compile --arch "$cc" --first-config --jobs "$(nproc)" \
  --out "$OUT/triton_compile_sm$cc.json" 2>&1 | tail -25 | tee -a "$log"

step "bench attention (ViT-B/16, L=4096 causal, varlen)"
timeout 120 "$PY" -m benchmarks.bench_attention --cases vit_b16,long_causal,varlen_causal 2>&1 | tail -30 | tee -a "$log"
for op in fused contrastive patch_embed; do
  [ -f "benchmarks/bench_$op.py" ] || continue
  step "bench $op"
  timeout 30 "$PY" -m "benchmarks.bench_$op" --quick 2>&1 | tail -20 | tee -a "$log"
done
step "bench native_resolution (the issue target: 64 images 64-512 px, ViT-B/16, packed vs padded)"
timeout 60 "$PY" -m benchmarks.bench_native_resolution 2>&1 | tail -8 | tee -a "$log"
step "done in $((SECONDS - start)) s"
