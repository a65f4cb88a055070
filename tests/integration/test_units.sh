#!/bin/bash
# Checks the systemd units of deploy/ with `systemd-analyze verify` (the binaries they start are
# replaced by a stub, since they are not installed here) and that each keeps the settings the
# daemons rely on. Exit 77 (skipped) without systemd-analyze.
set -u
src=${1:?usage: test_units.sh DEPLOY_DIR}
command -v systemd-analyze >/dev/null || { echo "no systemd-analyze: skipped"; exit 77; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/dsv32-units-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
fail=0

printf '#!/bin/sh\nexit 0\n' > "$tmp/stub"
chmod +x "$tmp/stub"
for u in dsv32-router.service dsv32-attn@.service dsv32-expert@.service; do
    [ -f "$src/$u" ] || { echo "FAIL: $u missing"; fail=1; continue; }
    sed "s#/usr/bin/dsv32-[a-z]*#$tmp/stub#" "$src/$u" > "$tmp/$u"
    for want in '^Type=notify$' '^NotifyAccess=main$' '^WatchdogSec=' '^Restart=on-failure$' \
                '^EnvironmentFile=/etc/dsv32/' '^ExecStart=/usr/bin/dsv32-' \
                '--etcd \${DSV32_ETCD}' '--cluster \${DSV32_CLUSTER}' \
                '--listen \${DSV32_LISTEN}' '--id ' \
                '^NoNewPrivileges=yes$' '^ProtectSystem=strict$' '^TimeoutStopSec='; do
        grep -qE -e "$want" "$src/$u" || { echo "FAIL: $u lacks $want"; fail=1; }
    done
done
check() { # FILE REGEX WHAT
    grep -qE -e "$2" "$src/$1" || { echo "FAIL: $1: $3"; fail=1; }
}
check dsv32-router.service '^EnvironmentFile=/etc/dsv32/router.env$' "environment file"
check dsv32-attn@.service '^EnvironmentFile=/etc/dsv32/attn-%i.env$' "environment file"
check dsv32-expert@.service '^EnvironmentFile=/etc/dsv32/expert-%i.env$' "environment file"
check dsv32-attn@.service '--id %i ' "node id from the instance name"
check dsv32-expert@.service '--id %i ' "node id from the instance name"

# Instances of the templates, as systemd would start them.
ln -s dsv32-attn@.service "$tmp/dsv32-attn@0.service"
ln -s dsv32-expert@.service "$tmp/dsv32-expert@0.service"
out=$(cd "$tmp" && systemd-analyze verify --man=no "$tmp/dsv32-router.service" \
      "$tmp/dsv32-attn@0.service" "$tmp/dsv32-expert@0.service" 2>&1)
rc=$?
# Anything it prints is a finding (unknown keys are only warnings with exit status 0).
if [ $rc -ne 0 ] || [ -n "$out" ]; then
    echo "FAIL: systemd-analyze verify (rc $rc):"
    echo "$out"
    fail=1
fi

# Example environment files: shell-style assignments of the variables the units use.
for f in router.env attn-0.env expert-0.env; do
    p="$src/examples/$f"
    [ -f "$p" ] || { echo "FAIL: examples/$f missing"; fail=1; continue; }
    if grep -vE '^(#.*|[A-Z0-9_]+=.*|)$' "$p"; then
        echo "FAIL: examples/$f: the lines above are not assignments"
        fail=1
    fi
    for v in DSV32_ETCD DSV32_CLUSTER DSV32_LISTEN; do
        grep -q "^$v=" "$p" || { echo "FAIL: examples/$f lacks $v"; fail=1; }
    done
done
[ $fail -eq 0 ] && echo "units OK"
exit $fail
