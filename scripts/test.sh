#!/usr/bin/env bash
# Runs every Crier test: formatting, lints, unit and integration tests (a real browser included).
# Installs what the tests need when it is missing, and is quick when it is present.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: Chromium for the browser test, Prometheus (promtool and the server) for the
# metrics tests, Node.js to drive the browser, redis-server and redis-cli for the tests that run
# Redis (and Redis Cluster) servers of their own beside the machine's Redis on 6379.
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v chromium >/dev/null || missing+=(chromium)
command -v promtool >/dev/null || missing+=(prometheus)
command -v node >/dev/null || missing+=(nodejs npm)
if ((${#missing[@]})); then
    echo "scripts/test.sh: installing ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# npm packages for the browser tests and the JavaScript client, installed again whenever a lock
# file is newer than what node_modules holds.
for dir in tests/browser clients/js; do
    [ "$dir/node_modules/.package-lock.json" -nt "$dir/package-lock.json" ] \
        || npm ci --prefix "$dir" --no-audit --no-fund
done

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
if command -v cargo-nextest >/dev/null; then
    cargo nextest run --workspace --no-fail-fast
else
    cargo test --workspace --no-fail-fast
fi
cargo test --workspace --doc
# The JavaScript client against the broker binary the Rust tests built.
cargo build -p crier
npm test --prefix clients/js
