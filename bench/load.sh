#!/usr/bin/env bash
# The load test of docs/BENCHMARKS.md ("Load test"): a local cluster (dsv32ctl cluster up --local,
# the built-in small model), load_test's concurrent Generate streams in rounds, the cluster down
# again whatever happens. Extra arguments go to load_test (--streams N --max-tokens N --rounds R).
#   bench/load.sh [--attn N] [--experts M] [load_test options]      (build first: deploy/build.sh)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
build=${DSV32_BUILD_DIR:-$here/build}
attn=1 experts=0
args=()
while [ $# -gt 0 ]; do
    case "$1" in
    --attn) attn=$2; shift 2 ;;
    --experts) experts=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
    esac
done
state=$(mktemp -d /tmp/dsv32-load-XXXXXX)
trap '"$build/ctl/dsv32ctl" cluster down --dir "$state" >/dev/null || true; rm -rf "$state"' EXIT
trap 'exit 143' TERM INT HUP # a killed run still takes its cluster down
"$build/ctl/dsv32ctl" cluster up --local --dir "$state" --attn "$attn" --experts "$experts" \
    --watch-pid $$
if ! "$build/bench/load_test" --dir "$state" --streams 200 "${args[@]}"; then
    for log in "$state"/logs/*.log; do
        echo "--- $log (last lines)" >&2
        tail -n 20 "$log" >&2
    done
    exit 1
fi
