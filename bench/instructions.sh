#!/usr/bin/env bash
# User-space instructions the broker spends per delivered message, counted by callgrind: a figure
# that does not move with the machine's noise (the same binary and load give the same count to
# within 1%, whatever else runs), for judging a small change to the publish path that
# bench/regress.sh cannot see through the noise.
#
#   bench/instructions.sh [CRIER_BINARY...]            # default: target/release/crier
#   SUBSCRIBERS=100 bench/instructions.sh /tmp/crier-before target/release/crier
#
# Each binary runs under valgrind on a free port, with default settings, and gets a paced
# `crier-bench fanout` (RATE publishes per second for DURATION seconds, SUBSCRIBERS subscribers,
# 64 B); a second, shorter run is subtracted, so start-up and connection set-up cancel out and
# what is printed is the instructions of one more delivery. Kernel time is not counted. A paced
# run reads one publish per syscall, so its count weighs per-read costs more than a saturated
# run does; compare binaries with it, not with bench/cost.sh's figures.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-4000}
DURATION=${DURATION:-4}
SUBSCRIBERS=${SUBSCRIBERS:-1}
binaries=("$@")
[ ${#binaries[@]} -gt 0 ] || binaries=(target/release/crier)
command -v valgrind >/dev/null || { echo "instructions.sh: valgrind is needed (Debian package valgrind)" >&2; exit 1; }
[ -x target/release/crier ] || cargo build --release -p crier
[ -x target/release/crier-bench ] || cargo build --release -p crier-bench
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Prints "instructions delivered" for one run of $2 seconds against binary $1.
run() {
    local port out vg
    port=$(free_port)
    out=$work/callgrind.$RANDOM
    valgrind --tool=callgrind --callgrind-out-file="$out" "$1" --listen "127.0.0.1:$port" --log error \
        2>"$work/valgrind.log" &
    vg=$!
    for _ in $(seq 150); do
        curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
        sleep 0.2
    done
    local summary
    summary=$(target/release/crier-bench --url "ws://127.0.0.1:$port/ws" fanout \
        --subscribers "$SUBSCRIBERS" --payload 64 --rate "$RATE" --duration "$2" | head -1)
    kill -INT "$vg"
    wait "$vg" || true
    local instructions
    instructions=$(grep -h '^totals:' "$out"* | awk '{ s += $2 } END { print s }')
    echo "$instructions $(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["delivered"])' "$summary")"
}

for crier in "${binaries[@]}"; do
    read -r long_ir long_n < <(run "$crier" "$DURATION")
    read -r short_ir short_n < <(run "$crier" $((DURATION / 2)))
    python3 - "$crier" "$long_ir" "$long_n" "$short_ir" "$short_n" "$SUBSCRIBERS" <<'PY'
import json, sys
crier, long_ir, long_n, short_ir, short_n, subscribers = sys.argv[1:]
extra = int(long_n) - int(short_n)
print(json.dumps({
    "crier": crier,
    "subscribers": int(subscribers),
    "payload": 64,
    "delivered": int(long_n),
    "instructions_per_delivery": round((int(long_ir) - int(short_ir)) / max(extra, 1)),
}))
PY
done
