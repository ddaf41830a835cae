#!/usr/bin/env bash
# CPU rehearsal of bench/gpu_check.sh in a simulated GPU image (CI runs it):
#   1. the packages the image lacks are made unimportable (bench/simulated_image:
#      a sitecustomize meta-path blocker on PYTHONPATH), and `pytest tests/
#      --collect-only` must collect without errors (a minimal install);
#   2. the carried wheels (bench/gpu_wheels.txt, plus bench/simulated_image/
#      image_wheels.txt: what the image has and this machine may not) are
#      installed the way the GPU machine installs them (pip --no-index --no-deps
#      --target; only that folder's copies get past the blocker), and every step
#      of bench/gpu_check.sh runs on the CPU (GPU_CHECK_CPU_REHEARSAL=1);
#   3. every step must be ok, and exactly the 8 result files written.
#
#   bench/rehearse_gpu_check.sh [RESULTS_DIR]     (default: a new temporary folder)
#
# Environment: PYTHON (default python); WHEELS_DIR: a folder with those wheels
# for this Python (default: downloaded now from the package index with the
# command in bench/gpu_wheels.txt, for this Python's version). Takes 15-25
# minutes on a 2-core machine (mostly the extension build and the interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
out="${1:-$(mktemp -d)}"
work=$(mktemp -d)
simulated="$PWD/bench/simulated_image"

wheels="${WHEELS_DIR:-}"
if [ -z "$wheels" ]; then
  wheels="$work/wheels"
  version=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  echo "downloading the carried wheels for Python $version into $wheels"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$wheels" -r bench/gpu_wheels.txt -r bench/simulated_image/image_wheels.txt
fi

echo "== the whole test suite collects in the simulated image, nothing carried"
if ! PYTHONPATH="$simulated:$PWD" "$PY" -m pytest tests/ --collect-only -q -p no:cacheprovider >"$work/collect.txt" 2>&1; then
  tail -n 40 "$work/collect.txt"
  echo "REHEARSAL FAILED: pytest tests/ does not collect without the packages the GPU image lacks"
  exit 1
fi
tail -n 1 "$work/collect.txt"

echo "== bench/gpu_check.sh on the CPU, simulated image + carried wheels"
target="$work/site"
status=0
PYTHONPATH="$simulated${PYTHONPATH:+:$PYTHONPATH}" STDD_SIMULATED_IMAGE_ALLOW="$target" WHEELS_TARGET="$target" \
  WHEELS_DIR="$wheels" GPU_CHECK_CPU_REHEARSAL=1 PYTHON="$PY" bench/gpu_check.sh "$out" || status=$?

summary="$out/gpu_check_summary.txt"
problems=()
[ "$status" -eq 0 ] || problems+=("bench/gpu_check.sh exited $status")
grep -q '^FAILED' "$summary" && problems+=("a step failed: $(grep '^FAILED' "$summary" | tr '\n' ';')")
grep -q 'WARNING' "$summary" && problems+=("$(grep WARNING "$summary")")
[ "$(grep -c '^ok' "$summary")" -eq 6 ] || problems+=("expected 6 ok steps, got $(grep -c '^ok' "$summary")")
files=$(find "$out" -type f | wc -l)
[ "$files" -eq 8 ] || problems+=("expected 8 result files, got $files: $(ls -A "$out" | tr '\n' ' ')")
if [ ${#problems[@]} -gt 0 ]; then
  printf 'REHEARSAL FAILED: %s\n' "${problems[@]}"
  exit 1
fi
echo "rehearsal ok: every step of bench/gpu_check.sh passed in the simulated image; results in $out"
