#!/usr/bin/env bash
# Configures and builds dsv32 into build/ (or $DSV32_BUILD_DIR). Extra arguments go to cmake, e.g.
# deploy/build.sh -DDSV32_SANITIZE=address -DDSV32_CUDA=OFF
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
build=${DSV32_BUILD_DIR:-$here/build}
cmake -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE:-RelWithDebInfo} "$@" >/dev/null
cmake --build "$build" -j"$(nproc)"
