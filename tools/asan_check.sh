#!/usr/bin/env bash
# The engine under AddressSanitizer: builds jax_ddl's extension with ASan and runs the
# tests of its failure paths (late and stalled ranks, timeouts, late and short messages
# across processes) and of concurrent calls against it. Any ASan report fails the run.
#
#   bash tools/asan_check.sh            # from the repository root, after the README set-up
#
# jaxlib is not instrumented; ASan's allocator and checks cover jax_ddl's own code and its
# accesses to XLA's buffers. Leak checking is off (CPython keeps objects until exit).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
OUT=build/asan
rm -rf "$OUT/pkg" "$OUT/reports"
mkdir -p "$OUT/pkg" "$OUT/reports"

"$PY" -m pip install --quiet nanobind
cmake -S . -B "$OUT/build" -DPython_EXECUTABLE="$PWD/$PY" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_FLAGS="-fsanitize=address -fno-omit-frame-pointer" \
    -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address" > "$OUT/cmake.log"
cmake --build "$OUT/build" --parallel 2 > "$OUT/build.log"

# The package with the instrumented extension, ahead of the installed one on the path.
cp -r src/jax_ddl "$OUT/pkg/"
cp "$OUT"/build/_ddl*.so "$OUT/pkg/jax_ddl/"

# Loaded first: ASan, and libstdc++ so that ASan finds the C++ runtime it intercepts.
PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so.6)"
status=0
LD_PRELOAD="$PRELOAD" PYTHONPATH="$PWD/$OUT/pkg" \
ASAN_OPTIONS="detect_leaks=0:log_path=$PWD/$OUT/reports/asan" \
    "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_errors.py tests/test_schedules.py \
    "tests/test_multiprocess.py::test_a_process_late_past_the_deadline_never_gets_wrong_sums" \
    "tests/test_multiprocess.py::test_a_short_message_is_an_error_never_stale_bytes" \
    "tests/test_multiprocess.py::test_a_missing_or_different_process_fails_the_others_within_the_deadline" \
    || status=$?

if compgen -G "$OUT/reports/asan*" > /dev/null; then
    echo "AddressSanitizer reports:"
    cat "$OUT"/reports/asan*
    exit 1
fi
if [ "$status" -ne 0 ]; then
    echo "tests failed under ASan (status $status)"
    exit "$status"
fi
echo "ASan: no reports"
