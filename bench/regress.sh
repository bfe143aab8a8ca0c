#!/usr/bin/env bash
# Before/after check for a change to the broker: broker CPU per delivery (bench/cost.sh) at
# 1 × 64 B and 100 × 64 B, and `crier-bench fanout` delivered/s, each the median of REPEAT runs
# against a fresh Crier per binary, with default settings but for the limit of connections per
# address (the load generator opens them all from one).
#
#   bench/regress.sh [CRIER_BINARY...]            # default: target/release/crier
#   REPEAT=7 bench/regress.sh /tmp/crier-before target/release/crier
#   SUBSCRIBERS=100 REPEAT=9 bench/regress.sh /tmp/crier-before target/release/crier
#
# With several binaries the runs alternate between them (a, b, a, b, ...), so that the drift of a
# shared machine over the minutes of a run falls on all of them alike. Never run it beside another
# benchmark or a build: on this 2-core machine the load generator shares the cores with the broker.
set -euo pipefail
cd "$(dirname "$0")/.."
REPEAT=${REPEAT:-5}
DURATION=${DURATION:-5}
SUBSCRIBERS=${SUBSCRIBERS:-1 100}
binaries=("$@")
[ ${#binaries[@]} -gt 0 ] || binaries=(target/release/crier)
[ -x target/release/crier ] || cargo build --release -p crier
[ -x target/release/crier-bench ] || cargo build --release -p crier-bench

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pids=()
ports=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null' EXIT
for crier in "${binaries[@]}"; do
    port=$(free_port)
    "$crier" --listen "127.0.0.1:$port" --max-connections-per-ip 0 --log warn &
    pids+=($!)
    ports+=("$port")
    for _ in $(seq 50); do
        curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
        sleep 0.1
    done
done

runs=$(mktemp)
for _ in $(seq "$REPEAT"); do
    for subscribers in $SUBSCRIBERS; do
        for i in "${!binaries[@]}"; do
            bench/cost.sh "${pids[$i]}" --url "ws://127.0.0.1:${ports[$i]}/ws" fanout \
                --subscribers "$subscribers" --payload 64 --duration "$DURATION" |
                python3 -c 'import json, sys; r = json.loads(sys.stdin.read()); r["crier"] = sys.argv[1]; print(json.dumps(r))' "${binaries[$i]}" |
                tee -a "$runs"
        done
    done
done
python3 - "$runs" "${binaries[@]}" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
for crier in sys.argv[2:]:
    for subscribers in sorted({r["subscribers"] for r in runs}):
        mine = [r for r in runs if r["crier"] == crier and r["subscribers"] == subscribers]
        print(json.dumps({
            "crier": crier, "subscribers": subscribers, "payload": 64, "runs": len(mine),
            "broker_cpu_us_per_delivery": statistics.median(r["broker_cpu_us_per_delivery"] for r in mine),
            "delivered_per_s": round(statistics.median(r["delivered_per_s"] for r in mine)),
        }))
PY
rm -f "$runs"
