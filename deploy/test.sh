#!/usr/bin/env bash
# The README's test command: build (warnings as errors when DSV32_WERROR=ON), then every ctest label
# that runs without a GPU (gpu tests skip themselves with status 77 where there is none).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/deploy/build.sh" -DDSV32_WERROR=${DSV32_WERROR:-OFF}
ctest --test-dir "${DSV32_BUILD_DIR:-$here/build}" --output-on-failure -j"$(nproc)" "$@"
