#!/usr/bin/env bash
# The one prepared script for a GPU machine (DESIGN.md): build, GPU tests, the Triton compile report for the
# device, benchmarks; results and logs into the folder given as $1. Budget: under 8 minutes on one H200.
# It assumes only what that machine has: python3 with torch and triton (3.6 there), nvcc maybe, no network and
# nothing to install. A missing piece (setuptools / pybind11, Python's headers or nvcc for the native build, pytest /
# hypothesis for the tests, pytest-xdist to run them in parallel, matplotlib for the plots) is logged and its step
# skipped or run without it; the other steps still run. Without a CUDA device the benchmarks are skipped (they would
# time the CPU). Each step's timeout is cut to what is left of the budget (BUDGET_S, 470 s), so the whole run ends
# within 8 minutes; each step's full output is in OUT_DIR/<step>.log, so a step cut short keeps what it printed.
# Usage: bash benchmarks/gpu_check.sh "$OUT"
# Where only a few result files come back from the machine, archive the folder into one:
#   bash benchmarks/gpu_check.sh /tmp/gc; tar -czf "$OUT/gpu_check.tgz" -C /tmp gc
set -uo pipefail
OUT="${1:?usage: gpu_check.sh OUT_DIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MMKERN_BENCH_DIR="$OUT" PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=1  # silences triton 3.9's notice; the default it names is what runs
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"
log="$OUT/gpu_check.log"
start=$SECONDS
budget=${BUDGET_S:-470}
step() { echo "== $* ($(date +%T), ${SECONDS}s)" | tee -a "$log"; }
# limit N: N seconds, or what is left of the budget if less (at least 1).
limit() { local left=$((budget - (SECONDS - start))); echo $((left < $1 ? (left > 1 ? left : 1) : $1)); }
has() { "$PY" -c "import $1" 2>/dev/null; }
# run NAME SECONDS LINES CMD...: CMD under a timeout, its whole output in OUT/NAME.log, its last LINES in the log.
run() {
  local name=$1 secs=$2 lines=$3
  shift 3
  timeout "$(limit "$secs")" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "$lines" "$OUT/$name.log" | tee -a "$log"
  [ $rc -eq 124 ] && echo "$name: cut off by its timeout (output so far in $name.log)" | tee -a "$log"
  return 0
}

step versions
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "no nvidia-smi"; } 2>&1 | tee -a "$log"
"$PY" - <<'EOF' 2>&1 | tee -a "$log"
import os, shutil, subprocess, sys, sysconfig
import torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "missing"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible to torch"
print("python", sys.version.split()[0], sys.executable, "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", tv, "device", gpu)
headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
print("Python.h", "found" if os.path.exists(headers) else f"missing ({headers}): the native build will fail")
nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
if nvcc:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.splitlines()
    print("nvcc", nvcc, *[line for line in out if "release" in line])
else:
    print("nvcc not found: the cuda backend is not built")
EOF
cc=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(0); print(a * 10 + b)" 2>/dev/null || echo none)
[ "$cc" = none ] && echo "no CUDA device: GPU tests skip, the compile report targets sm_90, benchmarks skipped" \
  | tee -a "$log"

step build
if has pybind11 && has setuptools; then
  arch="${MMKERN_CUDA_ARCHS:-$(case $cc in 90 | none) echo 90a ;; *) echo "$cc" ;; esac)}"
  MMKERN_CUDA_ARCHS="$arch" timeout "$(limit 150)" "$PY" setup.py build_ext --inplace -q >"$OUT/build.log" 2>&1 \
    && echo "built mmkern._C (CUDA archs $arch if nvcc was found)" | tee -a "$log" \
    || { tail -5 "$OUT/build.log"; echo "native build failed (see build.log): the cpu / cuda backends are skipped"; } \
      | tee -a "$log"
else
  echo "no pybind11 / setuptools: native module not built, the cpu / cuda backends are skipped" | tee -a "$log"
fi
"$PY" -m mmkern info 2>&1 | tee -a "$log"

step "GPU tests"
if has pytest && has hypothesis; then
  # Triton compiles each new kernel specialisation on first use, one compile at a time per process: autotuning an
  # attention shape compiles ~30 configs (fwd, dK/dV, dQ), ~0.6 s of CPU each with triton 3.6 (dev VM's EPYC), so
  # the tests run each autotuned kernel's first fitting config only (tests/conftest.py), in several processes
  # (pytest-xdist, where installed). The benchmarks autotune.
  workers=()
  has xdist && workers=(-n "$(($(nproc) < 8 ? $(nproc) : 8))")
  run tests 150 25 env MMKERN_TEST_FIRST_CONFIG=1 "$PY" -m pytest -v -rfEs -p no:cacheprovider \
    ${workers[@]+"${workers[@]}"} -k "gpu or cuda or override" \
    tests/test_attention.py tests/test_attention_vs_torch.py tests/test_fused.py tests/test_rms_norm.py \
    tests/test_contrastive.py tests/test_patch_embed.py tests/test_patch_embed_packed.py tests/test_backends.py
else
  echo "pytest / hypothesis missing: tests skipped" | tee -a "$log"
fi

if [ "$cc" = none ]; then
  step "benchmarks skipped: no CUDA device"
else
  step "bench attention (ViT-B/16, L=4096 causal, varlen)"
  run bench_attention 200 40 "$PY" -m benchmarks.bench_attention --cases vit_b16,long_causal,varlen_causal
  # bench_fused and bench_rms_norm time the CPU kernels only: not run here.
  for op in contrastive patch_embed; do
    step "bench $op"
    run "bench_$op" 30 20 "$PY" -m "benchmarks.bench_$op" --quick
  done
  step "bench native_resolution (the issue target: 64 images 64-512 px, ViT-B/16, packed vs padded)"
  run bench_native_resolution 60 8 "$PY" -m benchmarks.bench_native_resolution
fi
# Last: it needs no GPU (the same report can be made on any machine with the same triton), so the benchmarks go first.
arch=${cc/none/90}
step "Triton compile report (sm_$arch, first config of each variant, head dims 64 and 256)"
run triton_compile 90 25 "$PY" -m benchmarks.triton_compile --arch "$arch" --first-config --head-dims 64 256 \
  --jobs "$(nproc)" --out "$OUT/triton_compile_sm$arch.json"
step "done in $((SECONDS - start)) s"
