#!/usr/bin/env bash
# User-space instructions the broker spends per delivered message, counted by callgrind: a figure
# that moves far less with the machine's noise than CPU time does, for judging a small change to
# the publish path that bench/regress.sh cannot see through the noise.
#
#   bench/instructions.sh [CRIER_BINARY...]            # default: target/release/crier
#   SUBSCRIBERS=100 bench/instructions.sh /tmp/crier-before target/release/crier
#
# Each binary runs under valgrind on a free port, with default settings, and gets a paced
# `crier-bench fanout` (RATE publishes per second for DURATION seconds, SUBSCRIBERS subscribers,
# 64 B, ENCODING msgpack or json); a second, shorter run is subtracted, so start-up and connection set-up cancel out and
# what is printed is the instructions of one more delivery. Kernel time is not counted. A paced
# run reads one publish per syscall, so its count weighs per-read costs more than a saturated
# run does; compare binaries with it, not with bench/cost.sh's figures.
#
# The whole-run figure still moves between runs of one binary, by 1% on a quiet machine and by
# up to 20% on a busy one: how many frames each read and write carries, and how often idle tasks
# wake, depend on timing. FUNCTION counts only the instructions inside one function and what it
# calls, per publish, which for the publish path is the same run after run (one run per binary):
#
#   FUNCTION='*ConnectionActor::handle_frame*' bench/instructions.sh OLD NEW
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-4000}
DURATION=${DURATION:-4}
SUBSCRIBERS=${SUBSCRIBERS:-1}
FUNCTION=${FUNCTION:-}
ENCODING=${ENCODING:-msgpack}
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

# Prints "instructions delivered published" for one run of $2 seconds against binary $1.
run() {
    local port out vg
    port=$(free_port)
    out=$work/callgrind.$RANDOM
    local collect=()
    [ -z "$FUNCTION" ] || collect=(--toggle-collect="$FUNCTION")
    valgrind --tool=callgrind "${collect[@]}" --callgrind-out-file="$out" "$1" \
        --listen "127.0.0.1:$port" --log error 2>"$work/valgrind.log" &
    vg=$!
    for _ in $(seq 150); do
        curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
        sleep 0.2
    done
    local summary
    summary=$(target/release/crier-bench --url "ws://127.0.0.1:$port/ws" fanout \
        --subscribers "$SUBSCRIBERS" --payload 64 --encoding "$ENCODING" --rate "$RATE" \
        --duration "$2" | head -1)
    kill -INT "$vg"
    wait "$vg" || true
    local instructions
    instructions=$(grep -h '^totals:' "$out"* | awk '{ s += $2 } END { print s }')
    echo "$instructions $(python3 -c 'import json, sys; s = json.loads(sys.argv[1]); print(s["delivered"], s["published"])' "$summary")"
}

for crier in "${binaries[@]}"; do
    if [ -n "$FUNCTION" ]; then
        read -r ir delivered published < <(run "$crier" "$DURATION")
        python3 - "$crier" "$ir" "$published" "$SUBSCRIBERS" "$FUNCTION" <<'PY'
import json, sys
crier, ir, published, subscribers, function = sys.argv[1:]
print(json.dumps({
    "crier": crier,
    "subscribers": int(subscribers),
    "payload": 64,
    "published": int(published),
    "function": function,
    "instructions_per_publish": round(int(ir) / max(int(published), 1)),
}))
PY
        continue
    fi
    read -r long_ir long_n _ < <(run "$crier" "$DURATION")
    read -r short_ir short_n _ < <(run "$crier" $((DURATION / 2)))
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
