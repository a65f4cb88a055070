#!/usr/bin/env bash
# The scale run of docs/BENCHMARKS.md ("Scale run"): on one multi-GPU machine, the real daemons
# (etcd, dsv32-router, dsv32-attn x A, dsv32-expert x E; one process per GPU, NCCL between them)
# on a model with DeepSeek-V3.2's real layer dimensions and all 256 routed experts per MoE layer
# (random weights from dsv32-mkmodel), measured through the public API by scale_client:
#   run 1: placement by expert count: prefill tokens/s, decode tokens/s per GPU at each
#          concurrency, the time of one MoE exchange and the expert shards' load balance;
#   run 2: the same cluster placed by run 1's measured load with --redundant copies of the
#          busiest experts per layer: the load balance (and decode rate) again (--redundant 0: no run 2).
# Everything it starts is stopped when it ends, whatever happens. With the cuda backend and
# nvidia-smi, each run checks that every daemon's memory is on its own --gpu (the run fails when
# not: its numbers would be of daemons sharing a GPU).
#
#   bench/scale.sh [--attn A] [--experts E] [--layers L] [--dense D] [--shape v32|small]
#                  [--model DIR] [--backend cuda|cpu] [--transport nccl|tcp] [--redundant R]
#                  [--prompt-tokens P] [--max-tokens T] [--streams N,N,..] [--prefill-streams N]
#                  [--math fast|exact] [--ep-wire bf16|f32] [--bin DIR] [--tokenizer DIR] [--out DIR]
#                  [--temperature T] [--top-p P]
# --math: the cuda backend's numerics (DSV32_CUDA_MATH; default fast: FP8 weights stay FP8 and go
# through the FP8 tensor-core GEMMs, as in production; exact dequantizes them to f32 and matches
# the cpu backend bit for bit, at CUDA-core speed). --ep-wire: the activations' type between the
# attention daemons and the shards (default bf16, as DeepSeek's combine; f32 is exact).
# --temperature, --top-p: every request's sampling (default: the API's temperature 1, no top-p).
# --bin: where dsv32-router, dsv32-attn, dsv32-expert, dsv32-mkmodel, scale_client (and etcd, if
# not on PATH) are; default: the build tree. On the GPU machine, a gpu-bundle.sh folder (its lib/
# goes on LD_LIBRARY_PATH). Results: OUT/summary.txt, OUT/run{1,2}/{client.json,attn-*.json,logs}.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
attn=1 experts=3 layers=4 dense=1 shape=v32 model="" backend=cuda transport=nccl redundant=32
prompt=4096 max_tokens=128 streams="16,64,128" prefill_streams=8 bin="" tok="" out="" math=fast wire=bf16
temperature="" top_p=1
while [ $# -gt 0 ]; do
    case "$1" in
    --attn) attn=$2 ;;           --experts) experts=$2 ;;     --layers) layers=$2 ;;
    --dense) dense=$2 ;;         --shape) shape=$2 ;;         --model) model=$2 ;;
    --backend) backend=$2 ;;     --transport) transport=$2 ;; --redundant) redundant=$2 ;;
    --prompt-tokens) prompt=$2 ;; --max-tokens) max_tokens=$2 ;; --streams) streams=$2 ;;
    --prefill-streams) prefill_streams=$2 ;; --bin) bin=$2 ;; --tokenizer) tok=$2 ;;
    --out) out=$2 ;;             --math) math=$2 ;;           --ep-wire) wire=$2 ;;
    --temperature) temperature=$2 ;; --top-p) top_p=$2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "scale.sh: unknown argument $1 (--help)" >&2; exit 2 ;;
    esac
    shift 2
done
find_bin() { # NAME: the program from --bin, the build tree, or PATH
    local b=${DSV32_BUILD_DIR:-$here/build} p
    for p in ${bin:+"$bin/$1" "$bin/bin/$1"} "$b/router/$1" "$b/attn-shard/$1" "$b/expert-shard/$1" \
        "$b/tools/$1" "$b/bench/$1"; do
        [ -x "$p" ] && { echo "$p"; return; }
    done
    command -v "$1" || { echo "scale.sh: $1 not found (build it, or --bin DIR)" >&2; exit 1; }
}
[ -n "$bin" ] && [ -d "$bin/lib" ] && export LD_LIBRARY_PATH="$bin/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ROUTER=$(find_bin dsv32-router) ATTN=$(find_bin dsv32-attn) EXPERT=$(find_bin dsv32-expert)
MKMODEL=$(find_bin dsv32-mkmodel) CLIENT=$(find_bin scale_client) ETCD=$(find_bin etcd)
gpus=$((attn + experts))
case "$math" in fast|exact) export DSV32_CUDA_MATH=$math ;; *) echo "scale.sh: --math fast or exact" >&2; exit 2 ;; esac
out=${out:-$(mktemp -d /tmp/dsv32-scale-XXXXXX)}
mkdir -p "$out"
work=$(mktemp -d /tmp/dsv32-scale-run-XXXXXX)
pids=()
stop_all() { # SIGTERM, then SIGKILL after 30 s, of everything started
    local p t
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for t in $(seq 300); do
        local alive=0
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    pids=()
}
etcd_pid=""
cleanup() {
    local rc=$?
    stop_all
    if [ -n "$etcd_pid" ]; then kill "$etcd_pid" 2>/dev/null || true; wait "$etcd_pid" 2>/dev/null || true; fi
    rm -rf "$work"
    exit $rc
}
trap cleanup EXIT
trap 'exit 143' TERM INT HUP # so that a killed run still stops its daemons and removes its files

log() { echo "scale.sh: $*" | tee -a "$out/summary.txt" >&2; }
: > "$out/summary.txt"

# ---- the model ----
if [ -z "$model" ]; then
    model=$work/model
    t0=$(date +%s)
    "$MKMODEL" --out "$model" --shape "$shape" --layers "$layers" --dense "$dense" \
        ${tok:+--tokenizer "$tok"} > "$work/mkmodel.log" 2>&1 ||
        { cat "$work/mkmodel.log" >&2; exit 1; }
    log "model: shape $shape, $layers layers ($dense dense), written in $(( $(date +%s) - t0 )) s ($(du -sh "$model" | cut -f1))"
fi
vocab=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["vocab_size"])' "$model/config.json")
[ "$vocab" -gt 128000 ] && vocab=128000

# ---- etcd ----
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ecli=$(free_port) epeer=$(free_port)
"$ETCD" --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$ecli" \
    --advertise-client-urls "http://127.0.0.1:$ecli" --listen-peer-urls "http://127.0.0.1:$epeer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$epeer" \
    --initial-cluster "default=http://127.0.0.1:$epeer" > "$work/etcd.log" 2>&1 &
etcd_pid=$!
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$ecli") 2>/dev/null && break
    sleep 0.1
done
etcd=127.0.0.1:$ecli

# ---- one run: daemons up, scale_client, daemons down ----
kv_tokens=$(( (prompt + max_tokens + 64) ))
max_streams=$(echo "$streams,$prefill_streams" | tr ',' '\n' | sort -n | tail -1)
per_attn=$(( (max_streams + attn - 1) / attn ))
kv_blocks=$(( per_attn * ((kv_tokens + 63) / 64) + 64 ))

placement() { # DIR: each daemon's memory per GPU from nvidia-smi against DIR/daemons.txt (pid, id,
    # --gpu); appends its line to DIR/placement.txt; 1 when a daemon holds memory on another GPU
    [ "$backend" = cuda ] && command -v nvidia-smi > /dev/null || return 0
    nvidia-smi --query-gpu=index,pci.bus_id --format=csv,noheader > "$1/gpus.csv" || return 0
    nvidia-smi --query-compute-apps=pid,gpu_bus_id,used_memory --format=csv,noheader,nounits \
        > "$1/apps.csv" || return 0
    python3 - "$1" <<'PY' | tee -a "$1/placement.txt"
import sys
d = sys.argv[1]
bus = {}
for line in open(d + "/gpus.csv"):
    f = [x.strip() for x in line.split(",")]
    if len(f) == 2:
        bus[f[1].lower()] = int(f[0])
want = {}
for line in open(d + "/daemons.txt"):
    pid, name, gpu = line.split()
    want[pid] = (name, int(gpu))
seen, bad = {}, []
for line in open(d + "/apps.csv"):
    f = [x.strip() for x in line.split(",")]
    if len(f) != 3 or f[0] not in want:
        continue
    name, gpu = want[f[0]]
    g = bus.get(f[1].lower(), -1)
    seen.setdefault(name, []).append(f"GPU {g} {f[2]} MiB")
    if g != gpu:
        bad.append(f"{name} (--gpu {gpu}) holds {f[2]} MiB on GPU {g}")
print("placement: " + "; ".join(f"{n}: {', '.join(v)}" for n, v in sorted(seen.items())))
if bad:
    print("placement WRONG: " + "; ".join(bad))
    sys.exit(1)
PY
}

run() { # N EXTRA_ROUTER_ARGS...
    local n=$1 d=$out/run$1 i
    shift
    rm -rf "$d"
    mkdir -p "$d/logs"
    local cluster=scale$n
    "$ROUTER" --model "$model" --etcd "$etcd" --cluster "$cluster" --listen 127.0.0.1:0 \
        --port-file "$d/router.port" --ep-group g0 --ep-transport "$transport" \
        --max-inflight $((max_streams + 16)) --daemon-timeout-ms 900000 "$@" > "$d/logs/router.log" 2>&1 &
    pids+=($!)
    for i in $(seq 0 $((attn - 1))); do
        "$ATTN" --model "$model" --etcd "$etcd" --cluster "$cluster" --id "attn-$i" \
            --backend "$backend" --gpu "$i" --ep-group g0 --ep-stats "$d/attn-$i.json" \
            --max-seqs "$per_attn" --max-seq-len "$kv_tokens" --kv-blocks "$kv_blocks" \
            --ep-timeout-ms 120000 --ep-wire "$wire" --stats-interval 5 > "$d/logs/attn-$i.log" 2>&1 &
        pids+=($!)
        echo "$! attn-$i $i" >> "$d/daemons.txt"
    done
    for i in $(seq 0 $((experts - 1))); do
        "$EXPERT" --model "$model" --etcd "$etcd" --cluster "$cluster" --id "expert-$i" \
            --group g0 --backend "$backend" --gpu $((attn + i)) --timeout-ms 120000 --stats-interval 5 \
            > "$d/logs/expert-$i.log" 2>&1 &
        pids+=($!)
        echo "$! expert-$i $((attn + i))" >> "$d/daemons.txt"
    done
    for _ in $(seq 600); do [ -s "$d/router.port" ] && break; sleep 0.1; done
    [ -s "$d/router.port" ] || { log "run $n: the router did not start"; tail "$d/logs/router.log" >&2; return 1; }
    local rc=0 client dead="" waited=0 placed=""
    : > "$d/client.txt"
    "$CLIENT" --router "127.0.0.1:$(cat "$d/router.port")" --prompt-tokens "$prompt" \
        --max-tokens "$max_tokens" --streams "$streams" --prefill-streams "$prefill_streams" \
        --gpus "$gpus" --vocab "$vocab" --json "$d/client.json" --top-p "$top_p" \
        ${temperature:+--temperature "$temperature"} > "$d/client.txt" &
    client=$!
    # a daemon that exits (bad option, out of memory, a crash) fails the run at once: the client
    # would wait for it
    # the daemons' GPUs are checked once the run is under way (weights and caches allocated)
    while kill -0 "$client" 2>/dev/null; do
        for i in "${pids[@]}"; do kill -0 "$i" 2>/dev/null || dead="$dead $i"; done
        [ -n "$dead" ] && { kill "$client" 2>/dev/null; break; }
        waited=$((waited + 1))
        if [ -z "$placed" ] && [ $waited -ge 20 ]; then
            placed=ok
            placement "$d" || { placed=wrong; kill "$client" 2>/dev/null; break; }
        fi
        sleep 1
    done
    wait "$client" || rc=$?
    cat "$d/client.txt"
    if [ -z "$placed" ] && [ -z "$dead" ]; then placement "$d" || placed=wrong; fi
    [ -f "$d/placement.txt" ] && sed "s/^/run $n: /" "$d/placement.txt" >> "$out/summary.txt"
    if [ "$placed" = wrong ]; then log "run $n: a daemon's memory is on another daemon's GPU"; rc=1; fi
    if [ -n "$dead" ]; then log "run $n: a daemon exited (pid$dead)"; rc=1; fi
    stop_all
    if [ $rc != 0 ]; then
        log "run $n: scale_client failed ($rc); last log lines:"
        for f in "$d"/logs/*.log; do echo "--- $f" >&2; tail -n 15 "$f" >&2; done
        return 1
    fi
    sed "s/^/run $n: /" "$d/client.txt" >> "$out/summary.txt"
}

summarize() { # N: MoE time and shard balance from the attention daemons' --ep-stats
    python3 - "$out/run$1" "$1" <<'EOF' | tee -a "$out/summary.txt"
import glob, json, sys
d, n = sys.argv[1], sys.argv[2]
st = [json.load(open(f)) for f in sorted(glob.glob(d + "/attn-*.json"))]
if not st:
    print(f"run {n}: no EP stats"); sys.exit(0)
calls = sum(s["moe_calls"] for s in st); us = sum(s["moe_us"] for s in st)
shards = [sum(v) for v in zip(*[s["shard_pairs"] for s in st])]
mean = sum(shards) / len(shards)
layers = [l for l in zip(*[s["expert_pairs"] for s in st])]
per_exp = [[sum(x) for x in zip(*l)] for l in layers if l and l[0]]
hot = max((max(e) / (sum(e) / len(e)) for e in per_exp if sum(e)), default=0)
print(f"run {n}: MoE layer (dispatch + expert compute + combine, as the attention side waits) "
      f"{us / max(calls, 1):.0f} us mean over {calls} layer calls")
print(f"run {n}: expert shards' (token, expert) pairs {shards}: max/mean {max(shards) / mean:.3f}; "
      f"hottest expert {hot:.2f}x its layer's mean")
ph = {}
for s in st:
    for k, v in s.get("moe_phase_us", {}).items():
        ph[k] = ph.get(k, 0) + v
if ph and calls:
    print(f"run {n}: MoE layer by phase, attention side (us, mean): " +
          ", ".join(f"{k} {v / calls:.0f}" for k, v in ph.items()))
for f in sorted(glob.glob(d + "/logs/expert-*.log")):
    lines = [l for l in open(f, errors="replace") if "MoE:" in l]
    if lines:
        print(f"run {n}: {f.rsplit('/', 1)[1]}, last stats line: {lines[-1].split('MoE:', 1)[1].strip()}")
EOF
}

log "$attn attention + $experts expert GPUs, backend $backend$([ "$backend" = cuda ] && echo " (numerics $math)"), transport $transport (wire $wire), prompt $prompt, $max_tokens new tokens, streams $streams"
run 1
summarize 1
if [ "$redundant" -gt 0 ]; then
    loads=$(ls "$out"/run1/attn-*.json | paste -sd,)
    run 2 --ep-redundant "$redundant" --ep-load "$loads"
    summarize 2
fi
log "results in $out"
