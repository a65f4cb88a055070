#!/usr/bin/env bash
# The cuda backend's checks and benchmarks on a GPU machine, from binaries built elsewhere.
#   bench/cuda_gpu.sh bundle BUILD_DIR [DEST]   here: test_cuda_ops, dsv32-run, cuda_bench and test_ep plus the
#       shared libraries the GPU machine lacks (OpenBLAS, cJSON, gfortran; not libc, libstdc++ or
#       CUDA's own libraries, which it has) into DEST/bundle.tar.xz (default .gpucuda)
#   bench/cuda_gpu.sh run [DEST] [STEPS...]     there, from the repository root: unpacks the bundle and
#       runs the steps (default: ops golden bench torch), logs under $OUT (default /tmp/cuda_gpu)
# Steps: ops (each op family in its own process), replay (the forward op by op on the tiny models),
# ncu (Nsight Compute on the DSA kernels; NCU_KERNELS picks them), golden (tiny-bf16 and tiny-fp8, exact mode, all
# schedules; then the fast mode, sequential), bench (cuda_bench, each section in its own process,
# and the plot; CUDA_BENCH_PARTS picks sections), torch (the PyTorch baseline of DSA decode),
# repeat (one op family REPEAT_N times: REPEAT_ONLY, REPEAT_ARGS), sanitize (compute-sanitizer's
# SAN_TOOL on one op family: SAN_ONLY, SAN_ARGS), ep (test_ep --nccl on the cuda backend, then the
# cpu's: expert parallelism over nccl, one process a GPU; needs 2 GPUs).
set -uo pipefail
cmd=${1:-run}
shift || true
case "$cmd" in
bundle)
    build=$1
    dest=${2:-.gpucuda}
    tmp=$(mktemp -d)
    mkdir -p "$tmp/bin" "$tmp/lib" "$dest"
    for p in tests/gpu/test_cuda_ops tools/dsv32-run bench/cuda_bench tests/unit/test_ep; do
        cp "$build/$p" "$tmp/bin/"
        ldd "$build/$p" | awk '/=> \//{print $3}' |
            grep -vE '/(libc|libm|libstdc\+\+|libgcc_s|libz|libdl|libpthread|librt|ld-linux[^/]*)\.so|/usr/local/cuda' |
            while read -r lib; do cp -L "$lib" "$tmp/lib/"; done
    done
    tar -C "$tmp" -cJf "$dest/bundle.tar.xz" bin lib
    rm -rf "$tmp"
    du -sh "$dest/bundle.tar.xz"
    ;;
run)
    dest=${1:-.gpucuda}
    shift || true
    steps=${*:-ops golden bench torch}
    out=${OUT:-/tmp/cuda_gpu}
    root=/tmp/cuda_gpu_bundle
    mkdir -p "$out" "$root"
    tar -C "$root" -xJf "$dest/bundle.tar.xz" || exit 1
    cudalib=""
    for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib; do
        [ -d "$d" ] && cudalib="$cudalib:$d"
    done
    export LD_LIBRARY_PATH="$root/lib$cudalib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    bin=$root/bin
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu \
        --format=csv >"$out/gpu.txt" 2>&1
    ldd "$bin/test_cuda_ops" | grep -E "cublas|cudart|not found" >>"$out/gpu.txt"
    # run NAME LOG TIMEOUT CMD...: output appended to LOG, its last lines echoed
    run() {
        local name=$1 log=$2 t=$3
        shift 3
        local t0=$SECONDS
        echo "==== $name" >>"$log"
        timeout "$t" "$@" >>"$log" 2>&1
        local rc=$?
        echo "==== $name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$log"
        return 0
    }
    for s in $steps; do
        case "$s" in
        ops)
            for part in ${CUDA_OPS_PARTS:-"upload" "small" "FP8 quant" "linear" "indexer" "MLA decode" "dsa op" "MLA prefill" "router" "experts" "sampling"}; do
                run "ops: $part" "$out/ops.log" 150 "$bin/test_cuda_ops" --only "$part"
            done
            grep -E "FAIL|PASS|checks" "$out/ops.log" | tail -n 40
            ;;
        ep)
            # test_ep finds the golden models where the bundle was built: linked to this tree's
            g=$(strings "$bin/test_ep" | grep -m1 '/tests/golden$')
            if [ -n "$g" ] && [ ! -e "$g" ]; then
                mkdir -p "$(dirname "$g")" && ln -sfn "$PWD/tests/golden" "$g"
            fi
            DSV32_TEST_BACKEND=cuda run "ep: nccl, cuda backend" "$out/ep.log" 280 "$bin/test_ep" --nccl
            run "ep: nccl, cpu backend" "$out/ep.log" 200 "$bin/test_ep" --nccl
            grep -E "OK|FAIL|PASS|skipped|rel|differ|====" "$out/ep.log" | tail -n 40
            ;;
        replay)
            for m in tiny-bf16 tiny-fp8; do
                run "replay $m" "$out/ops.log" 150 "$bin/test_cuda_ops" --only forward --model tests/golden/$m
                run "drift $m" "$out/ops.log" 150 "$bin/test_cuda_ops" --only drift --model tests/golden/$m \
                    --golden tests/golden/$m/golden.safetensors
            done
            awk '/==== (replay|drift)/,0' "$out/ops.log" | grep -vE "^[0-9]{2}:" | tail -n 80
            ;;
        ncu)
            ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
            for k in ${NCU_KERNELS:-idx_wgmma topk mla_fast}; do
                run "ncu $k" "$out/ncu.log" 120 "$ncu" --clock-control none --section SpeedOfLight --section Occupancy \
                    --section WarpStateStats --section LaunchStats --section MemoryWorkloadAnalysis \
                    -k regex:$k -c 1 "$bin/cuda_bench" --only dsa --iters 1
            done
            grep -E "====|Duration|Throughput|Achieved Occupancy|Registers|Stall|Warp Cycles|Issued|Eligible|Block Limit" "$out/ncu.log" | head -n 90
            ;;
        golden)
            for m in tiny-bf16 tiny-fp8; do
                DSV32_CUDA_MATH=exact run "golden exact $m" "$out/golden.log" 150 "$bin/dsv32-run" --model tests/golden/$m \
                    --golden tests/golden/$m/golden.safetensors --backend cuda --schedule all --quiet
            done
            for m in tiny-bf16 tiny-fp8; do
                DSV32_CUDA_MATH=fast run "golden fast $m" "$out/golden.log" 100 "$bin/dsv32-run" --model tests/golden/$m \
                    --golden tests/golden/$m/golden.safetensors --backend cuda --schedule sequential --quiet
            done
            grep -E "^(PASS|FAIL)|logit rows|ties resolved|====" "$out/golden.log"
            ;;
        bench)
            for part in ${CUDA_BENCH_PARTS:-dsa sweep prefill moe layer ops}; do
                run "bench: $part" "$out/bench.log" 180 "$bin/cuda_bench" --only "$part" --csv "$out"
            done
            [ -f "$out/dsa_sweep.csv" ] && python3 bench/plot_dsa.py "$out/dsa_sweep.csv" "$out/dsa-vs-dense.png"
            cat "$out/bench.log" | grep -vE "^\[" | tail -n 80
            ;;
        repeat)
            # REPEAT_N runs of one op family (REPEAT_ONLY, default indexer) with REPEAT_ARGS (e.g.
            # "--seed 356703124831175 --idx-items 1"): each run's seed and failures
            for i in $(seq 1 "${REPEAT_N:-10}"); do
                # shellcheck disable=SC2086 # REPEAT_ARGS is a list of arguments
                run "repeat $i: ${REPEAT_ONLY:-indexer} ${REPEAT_ARGS:-}" "$out/repeat.log" 150 \
                    "$bin/test_cuda_ops" --only "${REPEAT_ONLY:-indexer}" ${REPEAT_ARGS:-}
            done
            grep -E "seed|FAIL|checks" "$out/repeat.log" | tail -n 60
            ;;
        sanitize)
            # compute-sanitizer (SAN_TOOL: racecheck, synccheck, memcheck, initcheck; default
            # racecheck) on one op family (SAN_ONLY, default indexer) with SAN_ARGS
            san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
            # shellcheck disable=SC2086 # SAN_ARGS is a list of arguments
            run "sanitize ${SAN_TOOL:-racecheck}: ${SAN_ONLY:-indexer}" "$out/sanitize.log" 550 "$san" \
                --tool "${SAN_TOOL:-racecheck}" "$bin/test_cuda_ops" --only "${SAN_ONLY:-indexer}" ${SAN_ARGS:-}
            grep -vE "^\[" "$out/sanitize.log" | grep -E "=====|ERROR|hazard|checks|FAIL" | head -n 60
            ;;
        torch)
            PYTHONUNBUFFERED=1 run "torch baseline" "$out/torch.log" 150 python3 bench/dsa_torch.py --batch 64 --ctx 131072
            tail -n 3 "$out/torch.log"
            ;;
        *)
            echo "unknown step $s"
            ;;
        esac
    done
    ;;
*)
    echo "usage: $0 bundle BUILD_DIR [DEST] | run [DEST] [STEPS...]" >&2
    exit 2
    ;;
esac
