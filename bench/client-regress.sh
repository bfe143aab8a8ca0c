#!/usr/bin/env bash
# Before/after check for a change to crier-client: the load generator's CPU per delivery
# (bench/cost.sh's client_cpu_us_per_delivery) at SUBSCRIBERS × 64 B, for several builds of
# crier-bench taking turns against one release Crier, REPEAT runs each, with the median of each.
#
#   bench/client-regress.sh /tmp/crier-bench-before target/release/crier-bench
#   SUBSCRIBERS=1000 REPEAT=7 bench/client-regress.sh /tmp/crier-bench-before target/release/crier-bench
#
# The broker is the same for every run, so what moves is the client (and the bench's own per
# message work, the same in every build). Never run it beside another benchmark or a build.
set -euo pipefail
cd "$(dirname "$0")/.."
REPEAT=${REPEAT:-5}
DURATION=${DURATION:-5}
SUBSCRIBERS=${SUBSCRIBERS:-100}
[ $# -gt 0 ] || { echo "usage: bench/client-regress.sh CRIER_BENCH..." >&2; exit 2; }
[ -x target/release/crier ] || cargo build --release -p crier
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
target/release/crier --listen "127.0.0.1:$port" --max-connections-per-ip 0 --log warn 2>/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null; wait 2>/dev/null' EXIT
for _ in $(seq 50); do
    curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
    sleep 0.1
done
results=$(mktemp)
for _ in $(seq "$REPEAT"); do
    for bench in "$@"; do
        CRIER_BENCH=$bench bench/cost.sh "$pid" --url "ws://127.0.0.1:$port/ws" fanout \
            --subscribers "$SUBSCRIBERS" --payload 64 --duration "$DURATION" \
            | python3 -c "import json, sys; d = json.load(sys.stdin); d['bench'] = sys.argv[1]; print(json.dumps(d))" "$bench" \
            | tee -a "$results"
    done
done
python3 - "$results" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
for bench in dict.fromkeys(r["bench"] for r in runs):
    mine = [r for r in runs if r["bench"] == bench]
    print(json.dumps({
        "bench": bench, "subscribers": mine[0]["subscribers"], "runs": len(mine),
        "client_cpu_us_per_delivery": statistics.median(r["client_cpu_us_per_delivery"] for r in mine),
        "delivered_per_s": round(statistics.median(r["delivered_per_s"] for r in mine)),
    }))
PY
rm -f "$results"
