#!/usr/bin/env bash
# Configure, build and run the CMake library (CMakeLists.txt) and its ctest,
# CPU only, against the torch of the active Python. For CI and by hand:
#   tests/cpp/cmake_ctest.sh [build-dir]        (default: build/cmake)
# Environment: PYTHON (default python), CUDA_HOME (the CUDA build of torch
# makes find_package(Torch) look for the toolkit; default: the toolkit
# setup.py would build with, stdd_kernels/build_info.py), MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/../.."
build_dir="${1:-build/cmake}"
python="${PYTHON:-python}"
prefix="$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
cuda_home="${CUDA_HOME:-$("$python" stdd_kernels/build_info.py --cuda-root || true)}"
cuda=()
if [ -n "$cuda_home" ]; then cuda=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda_home"); fi
cmake -S . -B "$build_dir" "${generator[@]}" "${cuda[@]}" -DCMAKE_PREFIX_PATH="$prefix" -DSTDD_WITH_CUDA=OFF
cmake --build "$build_dir" --parallel "${MAX_JOBS:-2}"
ctest --test-dir "$build_dir" --output-on-failure
