#!/usr/bin/env bash
# The checks of the CUDA engine that need an NVIDIA GPU, in one run, from a clean tree:
# build the kernels for this GPU, run their checks on the device (every dtype and op, the
# plan's grids with P ranks as buffers on one GPU, a missing peer's timeout) and the
# stage bandwidth against a device-to-device copy. Writes everything to the folder given
# (default: gpu-results/) and prints a summary. Needs cmake and nvcc; no Python.
#
#   bash tools/gpu_check.sh [OUT]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-results}
mkdir -p "$OUT"
status=0

{ nvidia-smi || true; nvcc --version; cmake --version; } >"$OUT/machine.txt" 2>&1
if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi -L failed); nothing to check" | tee "$OUT/summary.txt"
  exit 1
fi

ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
echo "== build (kernels for this GPU's architecture, sm_$ARCH)"
if ! { cmake -S . -B "$BUILD" -DJAX_DDL_BUILD_PYTHON=OFF -DJAX_DDL_BUILD_TESTS=ON \
        -DJAX_DDL_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" &&
       cmake --build "$BUILD" --parallel "$(nproc)"; } >"$OUT/build.txt" 2>&1; then
  tail -40 "$OUT/build.txt"
  echo "gpu_check: build failed (see $OUT/build.txt)" | tee "$OUT/summary.txt"
  exit 1
fi

echo "== host tests (planner, host kernels, the CUDA stage schedule on the host)"
ctest --test-dir "$BUILD" --output-on-failure -E cuda_check 2>&1 | tee "$OUT/ctest.txt" || status=1

echo "== kernels on the GPU: checks and stage bandwidth"
timeout 300 "$BUILD/cuda_check" --bench --bench-mib 256 2>&1 | tee "$OUT/cuda_check.txt"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || status=1

{
  echo "gpu_check: $( [ $status -eq 0 ] && echo passed || echo FAILED )"
  echo "cuda_check exit code: $rc"
  grep -E "^#|^ +[0-9]" "$OUT/cuda_check.txt" || true
} | tee "$OUT/summary.txt"
exit $status
