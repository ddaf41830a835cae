#!/usr/bin/env bash
# The GPU check: on one GPU machine, build the C++/CUDA extension, run the
# Triton op/compile tests and every other CUDA-marked test on the GPU, and
# bench/stca.py, each step under a time limit. The plan (steps, limits,
# expected times, the worst case with every limit reached) is printed first;
# every step runs even when an earlier one fails; the exit status is non-zero
# if any failed. Writes 8 files to RESULTS_DIR, each as its step goes:
#   gpu_check_summary.txt      the plan, then one line per step as it ends
#   gpu_check_build.txt        the extension build log
#   gpu_check_tests.txt        pytest: tests/test_triton_ops.py, test_shared_projection_triton.py, test_compile.py
#   gpu_check_env.txt          python -m stdd_kernels.env after the build (GPU, versions, backends)
#   gpu_check_other_tests.txt  pytest -m cuda: every other CUDA test (extension, model, data)
#   stca_<gpu>.json/.csv/.txt  bench/stca.py (rows rewritten as they are measured)
#
#   bench/gpu_check.sh RESULTS_DIR
#
# Environment:
#   PYTHON            interpreter (default: python3)
#   WHEELS_DIR        wheels to install first, offline, without dependencies, into
#                     WHEELS_TARGET (default: a new temporary folder), which goes on
#                     PYTHONPATH (and its bin/ on PATH); see bench/gpu_wheels.txt
#   STDD_GIT_COMMIT   the commit of this checkout, recorded where there is no .git
#   MAX_JOBS (16), TORCH_CUDA_ARCH_LIST (9.0), CUDA_HOME (/usr/local/cuda): the build
#   PYTEST_WORKERS    pytest-xdist workers when pytest-xdist is installed (default 8)
#   BUILD_TIMEOUT TRITON_TESTS_TIMEOUT ENV_TIMEOUT OTHER_TESTS_TIMEOUT BENCH_TIMEOUT
#                     step limits in seconds (defaults below)
#   GPU_CHECK_CPU_REHEARSAL=1  the same steps on a CPU-only machine (Triton's
#                     interpreter, bench/stca.py --tiny, limits for a small CPU) to
#                     check the script itself; its timings mean nothing. See
#                     bench/rehearse_gpu_check.sh.
#
# The extension is built while the Triton tests run (they do not need it), into
# build/gpu_check/ (kept between runs: a rerun rebuilds only what changed), and
# moved into stdd_kernels/ when both are done. STDD_REQUIRE_EXTENSION=1 makes a
# failed compile fail the build, and the check after it fails unless the `cuda`
# backend was compiled (a build without nvcc would silently be CPU-only).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ $# -ne 1 ]; then
  echo "usage: bench/gpu_check.sh RESULTS_DIR" >&2
  exit 2
fi
RESULTS_DIR="$1"
mkdir -p "$RESULTS_DIR"
PY="${PYTHON:-python3}"
REHEARSAL="${GPU_CHECK_CPU_REHEARSAL:-0}"
KILL_AFTER=5  # seconds between a step's SIGINT/SIGTERM and SIGKILL
if [ "$REHEARSAL" = 1 ]; then
  # A loaded 2-core CPU: the interpreter, a full build on 2 jobs.
  : "${BUILD_TIMEOUT:=1800}" "${TRITON_TESTS_TIMEOUT:=1500}" "${ENV_TIMEOUT:=300}"
  : "${OTHER_TESTS_TIMEOUT:=900}" "${BENCH_TIMEOUT:=1200}" "${PYTEST_WORKERS:=2}" "${MAX_JOBS:=2}"
  export TRITON_INTERPRET=1
  BENCH_ARGS=(--tiny)
  EXPECT=(- - - - -)  # nothing to expect of a rehearsal's timings
else
  # One GPU machine (16 cores). Expected times: estimates from CPU measurements of the
  # build and test counts and from H100 stack timings; see bench/results/README.md.
  : "${BUILD_TIMEOUT:=190}" "${TRITON_TESTS_TIMEOUT:=120}" "${ENV_TIMEOUT:=30}"
  : "${OTHER_TESTS_TIMEOUT:=60}" "${BENCH_TIMEOUT:=130}" "${PYTEST_WORKERS:=8}" "${MAX_JOBS:=16}"
  unset TRITON_INTERPRET
  BENCH_ARGS=()
  EXPECT=(100 50 10 35 110)  # build, Triton tests (during the build), env, other tests, bench
fi
WHEELS_TIMEOUT=20
export MAX_JOBS
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # run from the checkout without installing

start=$(date +%s)
summary="$RESULTS_DIR/gpu_check_summary.txt"
: >"$summary"
failed=0
now() { echo $(( $(date +%s) - start )); }
step() { printf '\n=== [%4ss] %s\n' "$(now)" "$*"; }
note() { echo "$*" | tee -a "$summary"; }
record() {  # record NAME STATUS
  printf '%-8s %s (exit %s, at %ss)\n' "$([ "$2" -eq 0 ] && echo ok || echo FAILED)" "$1" "$2" "$(now)" \
    | tee -a "$summary"
  [ "$2" -eq 0 ] || failed=1
}
limited() {  # limited SECONDS SIGNAL COMMAND...: the command, stopped at the limit (exit 124)
  local limit="$1" signal="$2"
  shift 2
  timeout --signal="$signal" --kill-after="$KILL_AFTER" "$limit" "$@"
}

worst=$(( WHEELS_TIMEOUT + KILL_AFTER
  + (BUILD_TIMEOUT > TRITON_TESTS_TIMEOUT ? BUILD_TIMEOUT : TRITON_TESTS_TIMEOUT) + KILL_AFTER
  + ENV_TIMEOUT + KILL_AFTER + OTHER_TESTS_TIMEOUT + KILL_AFTER + BENCH_TIMEOUT + KILL_AFTER ))
{
  echo "GPU check plan ($([ "$REHEARSAL" = 1 ] && echo "CPU REHEARSAL: timings mean nothing" || echo "one GPU"))"
  echo "commit: ${STDD_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  row() { printf '  %-52s %8s %8s\n' "$@"; }
  row step "limit s" "expect s"
  row "install carried wheels (WHEELS_DIR)" "$WHEELS_TIMEOUT" "$([ "$REHEARSAL" = 1 ] && echo - || echo 5)"
  row "build extension (MAX_JOBS=$MAX_JOBS), in parallel with:" "$BUILD_TIMEOUT" "${EXPECT[0]}"
  row "  tests: Triton ops + compile" "$TRITON_TESTS_TIMEOUT" "${EXPECT[1]}"
  row "env report + cuda backend check" "$ENV_TIMEOUT" "${EXPECT[2]}"
  row "tests: every other cuda-marked test" "$OTHER_TESTS_TIMEOUT" "${EXPECT[3]}"
  row "bench/stca.py" "$BENCH_TIMEOUT" "${EXPECT[4]}"
  if [ "$REHEARSAL" = 1 ]; then
    echo "  worst case (every limit reached, +${KILL_AFTER}s each to stop): ${worst}s"
  else
    echo "  worst case (every limit reached, +${KILL_AFTER}s each to stop): ${worst}s;" \
      "expected: $(( 5 + EXPECT[0] + EXPECT[2] + EXPECT[3] + EXPECT[4] ))s"
  fi
} | tee -a "$summary"

if [ -n "${WHEELS_DIR:-}" ]; then
  step "install the carried wheels from $WHEELS_DIR"
  site="${WHEELS_TARGET:-$(mktemp -d)}"
  limited "$WHEELS_TIMEOUT" TERM "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$site" "$WHEELS_DIR"/*.whl
  record "install wheels into $site" $?
  export PYTHONPATH="$PYTHONPATH:$site"
  export PATH="$site/bin:$PATH"
fi

step "GPU present?"
if [ "$REHEARSAL" = 1 ]; then
  note "CPU rehearsal: no GPU needed"
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  note "no CUDA device visible to $PY: this script is for a GPU machine"
  exit 2
fi
if ! "$PY" -c "import open_clip" 2>/dev/null; then
  note "WARNING: open_clip does not import: the STCA block tests and the stack benchmark will fail (WHEELS_DIR)"
fi
xdist=()
if "$PY" -c "import xdist" 2>/dev/null; then
  xdist=(-n "$PYTEST_WORKERS")
else
  note "pytest-xdist not installed: tests run in one process"
fi

step "build the C++/CUDA extension (background) | tests: Triton ops + compile"
build_dir=build/gpu_check
(
  export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
  export STDD_REQUIRE_EXTENSION=1
  limited "$BUILD_TIMEOUT" TERM "$PY" setup.py build_ext --build-lib "$build_dir/lib" --build-temp "$build_dir/temp"
) >"$RESULTS_DIR/gpu_check_build.txt" 2>&1 &
build_pid=$!
# TRITON_INTERPRET is unset on a GPU, so these compile the kernels and pick the GPU;
# their cuda-marked cases (ViT-B/16 shapes, bf16/fp16, the CPU shape grid) run only there.
limited "$TRITON_TESTS_TIMEOUT" INT "$PY" -m pytest -q -p no:cacheprovider -rs --durations=10 ${xdist[@]+"${xdist[@]}"} \
  tests/test_triton_ops.py tests/test_shared_projection_triton.py tests/test_compile.py \
  >"$RESULTS_DIR/gpu_check_tests.txt" 2>&1
status=$?
tail -n 15 "$RESULTS_DIR/gpu_check_tests.txt"
record "tests: Triton ops + compile" "$status"
wait "$build_pid"
status=$?
tail -n 5 "$RESULTS_DIR/gpu_check_build.txt"
if [ "$status" -eq 0 ]; then
  built=$(find "$build_dir/lib/stdd_kernels" -maxdepth 1 -name '_C*.so' 2>/dev/null | head -n 1)
  if [ -n "$built" ]; then
    rm -f stdd_kernels/_C*.so && cp "$built" stdd_kernels/ || status=1
  else
    echo "the build wrote no stdd_kernels/_C*.so" | tee -a "$RESULTS_DIR/gpu_check_build.txt"
    status=1
  fi
fi
kind=$(grep -o 'stdd_kernels._C: .*' "$RESULTS_DIR/gpu_check_build.txt" | head -n 1)
record "build extension (${kind:-no build line})" "$status"

step "environment report; the extension must have the cuda backend"
limited "$ENV_TIMEOUT" TERM "$PY" - >"$RESULTS_DIR/gpu_check_env.txt" 2>&1 <<'EOF'
import sys
from stdd_kernels import env

report = env.collect()
print(env.format_report(report))
cuda = report["backends"].get("cuda", {})
if not cuda.get("available"):
    sys.exit(f"\nFAILED: the cuda backend is not available: {cuda.get('reason')}")
EOF
status=$?
cat "$RESULTS_DIR/gpu_check_env.txt"
record "env report + cuda backend compiled" "$status"

step "tests: every other cuda-marked test"
limited "$OTHER_TESTS_TIMEOUT" INT "$PY" -m pytest -q -p no:cacheprovider -rs -m cuda ${xdist[@]+"${xdist[@]}"} tests/ \
  --ignore=tests/test_triton_ops.py --ignore=tests/test_shared_projection_triton.py --ignore=tests/test_compile.py \
  >"$RESULTS_DIR/gpu_check_other_tests.txt" 2>&1
status=$?
[ "$status" -eq 5 ] && status=0  # pytest 5 = no other cuda-marked test exists: nothing failed
tail -n 15 "$RESULTS_DIR/gpu_check_other_tests.txt"
record "tests: other cuda-marked" "$status"

step "bench/stca.py"
if [ "$REHEARSAL" = 1 ]; then
  gpu=cpu_rehearsal
else
  gpu=$("$PY" -c "import torch, re; print(re.sub(r'[^a-z0-9]+', '_', torch.cuda.get_device_name().lower()).strip('_'))")
fi
limited "$BENCH_TIMEOUT" INT "$PY" bench/stca.py ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} --budget-s $(( BENCH_TIMEOUT - 20 )) \
  --out "$RESULTS_DIR/stca_${gpu}.json" 2>&1 | tee "$RESULTS_DIR/stca_${gpu}.txt"
record "bench/stca.py" "${PIPESTATUS[0]}"

rm -f "$RESULTS_DIR"/.*.tmp  # a write cut short by the limit (the results files themselves are whole)
step "done"
cat "$summary"
exit "$failed"
