#!/usr/bin/env bash
# The README's test command: build (warnings as errors when DSV32_WERROR=ON), then every ctest label
# that runs without a GPU (gpu tests skip themselves with status 77 where there is none).
#
# DSV32_JOB=asan: the AddressSanitizer job instead: a build with -DDSV32_SANITIZE=address in its own
# directory ($DSV32_ASAN_BUILD_DIR, default build-asan/), then the integration tests there. Every
# process they start (daemons, dsv32ctl, etcd fixtures) writes its sanitizer report to one log
# directory instead of a stderr nobody reads, and any report fails the job; known findings outside
# the control plane are listed in tests/asan/lsan.supp.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ "${DSV32_JOB:-}" != asan ]; then
    bash "$here/deploy/build.sh" -DDSV32_WERROR=${DSV32_WERROR:-OFF}
    ctest --test-dir "${DSV32_BUILD_DIR:-$here/build}" --output-on-failure -j"$(nproc)" "$@"
    exit 0
fi

build=${DSV32_ASAN_BUILD_DIR:-$here/build-asan}
DSV32_BUILD_DIR=$build bash "$here/deploy/build.sh" -DDSV32_WERROR=${DSV32_WERROR:-OFF} \
    -DDSV32_SANITIZE=address -DDSV32_CUDA=OFF
logs=$(mktemp -d /tmp/dsv32-asan-XXXXXX)
trap 'rm -rf "$logs"' EXIT
export ASAN_OPTIONS="log_path=$logs/report:detect_leaks=1"
export LSAN_OPTIONS="suppressions=$here/tests/asan/lsan.supp:print_suppressions=0"
status=0
ctest --test-dir "$build" --output-on-failure -j"$(nproc)" -L integration "$@" || status=$?
reports=$(find "$logs" -type f -size +0 | sort)
if [ -n "$reports" ]; then
    echo "test.sh: AddressSanitizer reports:" >&2
    for f in $reports; do
        echo "=== $f" >&2
        cat "$f" >&2
    done
    status=1
fi
[ $status -eq 0 ] && echo "test.sh: ASan job: integration tests passed, no sanitizer report"
exit $status
