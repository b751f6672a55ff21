#!/usr/bin/env bash
# The checks of the CUDA engine that need an NVIDIA GPU, in one run, from a clean tree:
# build the kernels for this GPU, run their checks on the device (every dtype and op, the
# plan's grids with P ranks as buffers on one GPU, a missing peer's timeout) and the
# stage bandwidth against a device-to-device copy; then install jax_ddl against this
# machine's jax and run the GPU tests (tests/test_gpu.py) and a short training run with
# --allreduce ddl. Writes everything to the folder given (default: gpu-results/) and
# prints a summary. Needs cmake, nvcc, and jax with its CUDA plugin, scikit-build-core and
# nanobind installed for python3 (or $PYTHON).
#
#   bash tools/gpu_check.sh [OUT]
#
# Budget: two builds for one architecture, then at most 150 + 180 + 150 s of checks, so
# the whole run fits in under 8 minutes on a 16-core machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
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
timeout 150 "$BUILD/cuda_check" --bench --bench-mib 256 2>&1 | tee "$OUT/cuda_check.txt"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || status=1

# The package against this machine's jax (its FFI headers), in a venv over the system's
# packages (this machine may have no package index: no build isolation, no downloads).
echo "== jax_ddl with the CUDA handler: GPU tests, a short training run"
PY=${PYTHON:-python3}
"$PY" -m venv --system-site-packages "$BUILD/venv" >"$OUT/install.txt" 2>&1
if "$BUILD/venv/bin/pip" install --no-build-isolation --no-deps \
    -Ccmake.define.JAX_DDL_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$ARCH" \
    . >>"$OUT/install.txt" 2>&1; then
  # The GPU backend and the CUDA handler must both be there, or nothing below tests them.
  if ! "$BUILD/venv/bin/python" -c "
import jax, jax_ddl
print(jax.__version__, jax.devices(), jax_ddl.supported_platforms())
assert jax.default_backend() == 'gpu', 'no GPU backend in jax'
assert 'cuda' in jax_ddl.supported_platforms(), 'jax_ddl built without its CUDA handler'
" 2>&1 | tee -a "$OUT/install.txt"; then
    status=1
  fi
  (cd tests && timeout 180 "$BUILD/venv/bin/python" -m pytest -q -rs -p no:cacheprovider test_gpu.py) \
    2>&1 | tee "$OUT/test_gpu.txt" | tail -15
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  grep -qE "[0-9]+ passed" "$OUT/test_gpu.txt" || { echo "gpu_check: no GPU test ran"; status=1; }
  timeout 150 "$BUILD/venv/bin/python" examples/train.py --allreduce ddl --epochs 1 \
    --out-dir "$OUT/train-ddl" --no-progress 2>&1 | tee "$OUT/train-ddl.txt" | tail -8
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  tail -30 "$OUT/install.txt"
  echo "gpu_check: installing jax_ddl failed (see $OUT/install.txt)"
  status=1
fi

{
  echo "gpu_check: $( [ $status -eq 0 ] && echo passed || echo FAILED )"
  echo "cuda_check exit code: $rc"
  grep -E "^#|^ +[0-9]" "$OUT/cuda_check.txt" || true
} | tee "$OUT/summary.txt"
exit $status
