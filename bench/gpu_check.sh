#!/usr/bin/env bash
# GPU check for a lent GPU machine (written for one H100): the CUDA-marked
# tests, the Triton op/compile tests on the GPU, and bench/stca.py, in under
# 8 minutes. Writes everything to RESULTS_DIR (default bench/results):
#   gpu_check_env.txt          python -m stdd_kernels.env (GPU, versions, backends)
#   gpu_check_tests.txt        pytest output (Triton ops + compile)
#   gpu_check_other_tests.txt  the other cuda-marked tests (C++/CUDA extension, model, data)
#   stca_<gpu>.json/.csv       bench/stca.py (op GB/s vs copy; 12-block stack timings)
#   gpu_check_summary.txt      the status of each step
#   gpu_check_build.txt        the extension build log (BUILD_EXTENSION=1 only)
# (at most 8 files: what a lent machine's $OUT hands back)
#
#   bench/gpu_check.sh [RESULTS_DIR]        e.g. bench/gpu_check.sh "$OUT"
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3),
# TRITON_TESTS_TIMEOUT / OTHER_TESTS_TIMEOUT / BENCH_TIMEOUT seconds (default
# 120 / 90 / 210: with start-up, under 8 minutes).
# Every step runs even when an earlier one fails; the exit status is non-zero
# if any failed. TRITON_INTERPRET is unset: the kernels must be compiled ones.
#
# GPU_CHECK_CPU_REHEARSAL=1 runs the same steps on a CPU-only machine (Triton
# interpreter, bench/stca.py --tiny) to check the script itself; its numbers mean nothing.
#
# WHEELS_DIR=DIR: install the wheels in DIR offline first (into a temporary
# --target directory put on PYTHONPATH). The lent machines' image has torch,
# triton, pytest and pytest-benchmark but not open_clip, which the STCA block,
# the stack test and the stack benchmark need: carry wheels of open_clip_torch,
# ftfy and wcwidth (how: /work/.library/device/README.md, "a Python package
# missing there").
# BUILD_EXTENSION=1: build the C++/CUDA extension in place first (nvcc, sm_90;
# adds a few minutes: raise the 8-minute budget accordingly) so the `cuda`
# backend is benchmarked and its cuda-marked tests run.
set -uo pipefail
cd "$(dirname "$0")/.."

RESULTS_DIR="${1:-bench/results}"
mkdir -p "$RESULTS_DIR"
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi
# Step limits (seconds); with start-up they sum to under 8 minutes.
TRITON_TESTS_TIMEOUT="${TRITON_TESTS_TIMEOUT:-120}"
OTHER_TESTS_TIMEOUT="${OTHER_TESTS_TIMEOUT:-90}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-210}"
REHEARSAL="${GPU_CHECK_CPU_REHEARSAL:-0}"
BENCH_ARGS=()
if [ "$REHEARSAL" = 1 ]; then
  export TRITON_INTERPRET=1
  BENCH_ARGS=(--tiny)
else
  unset TRITON_INTERPRET
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # run from the checkout without installing

if [ -n "${WHEELS_DIR:-}" ]; then
  site=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS_DIR"/*.whl \
    || { echo "installing the wheels in $WHEELS_DIR failed" >&2; exit 2; }
  export PYTHONPATH="$PYTHONPATH:$site"
fi

start=$(date +%s)
summary="$RESULTS_DIR/gpu_check_summary.txt"
: >"$summary"
failed=0
step() { printf '\n=== [%4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }
record() {  # record NAME STATUS
  printf '%-8s %s (exit %s, at %ss)\n' "$([ "$2" -eq 0 ] && echo ok || echo FAILED)" "$1" "$2" \
    "$(( $(date +%s) - start ))" | tee -a "$summary"
  [ "$2" -eq 0 ] || failed=1
}

step "GPU present?"
if [ "$REHEARSAL" = 1 ]; then
  echo "CPU rehearsal: no GPU needed, timings meaningless" | tee -a "$summary"
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device visible to $PY: this script is for a GPU machine" | tee -a "$summary"
  exit 2
fi

if ! "$PY" -c "import open_clip" 2>/dev/null; then
  echo "WARNING: open_clip does not import: the STCA block tests and the stack benchmark will fail (see WHEELS_DIR)" \
    | tee -a "$summary"
fi

if [ "${BUILD_EXTENSION:-0}" = 1 ]; then
  step "build the C++/CUDA extension in place"
  CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    MAX_JOBS="${MAX_JOBS:-16}" timeout 600 "$PY" setup.py build_ext --inplace \
    >"$RESULTS_DIR/gpu_check_build.txt" 2>&1
  record "build extension" $?
fi

step "environment report"
"$PY" -m stdd_kernels.env >"$RESULTS_DIR/gpu_check_env.txt" 2>&1
record "env report" $?
cat "$RESULTS_DIR/gpu_check_env.txt"

step "tests: the Triton op and compile tests on the GPU (their cuda-marked cases included)"
# TRITON_INTERPRET is unset, so these pick the GPU; the cuda-marked cases
# (ViT-B/16 shapes, bf16/fp16, the CPU shape grid on the GPU) run only here.
timeout --signal=INT --kill-after=15 "$TRITON_TESTS_TIMEOUT" \
  "$PY" -m pytest -q -p no:cacheprovider -rs --durations=10 \
  tests/test_triton_ops.py tests/test_compile.py \
  >"$RESULTS_DIR/gpu_check_tests.txt" 2>&1
status=$?
tail -n 20 "$RESULTS_DIR/gpu_check_tests.txt"
record "tests: triton ops + compile on GPU" "$status"

step "tests: every other cuda-marked test"
timeout --signal=INT --kill-after=15 "$OTHER_TESTS_TIMEOUT" \
  "$PY" -m pytest -q -p no:cacheprovider -rs -m cuda tests/ \
  --ignore=tests/test_triton_ops.py --ignore=tests/test_compile.py \
  >"$RESULTS_DIR/gpu_check_other_tests.txt" 2>&1
status=$?
[ "$status" -eq 5 ] && status=0  # pytest 5 = no other cuda-marked test exists: nothing failed
tail -n 20 "$RESULTS_DIR/gpu_check_other_tests.txt"
record "tests: other cuda-marked" "$status"

step "bench/stca.py"
if [ "$REHEARSAL" = 1 ]; then
  gpu=cpu_rehearsal
else
  gpu=$("$PY" -c "import torch, re; print(re.sub(r'[^a-z0-9]+', '_', torch.cuda.get_device_name().lower()).strip('_'))")
fi
timeout --signal=INT --kill-after=15 "$BENCH_TIMEOUT" \
  "$PY" bench/stca.py ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} --out "$RESULTS_DIR/stca_${gpu}.json" 2>&1 | tee "$RESULTS_DIR/stca_${gpu}.txt"
record "bench/stca.py" "${PIPESTATUS[0]}"

step "done"
cat "$summary"
exit "$failed"
