#!/usr/bin/env bash
# Crier against NATS over WebSocket, same scenarios, same load generator, same machine.
#
# Starts a fresh nats-server with WebSocket and a release Crier on free ports, runs `fanout` at
# 1, 100 and 1000 subscribers with 64-byte and 4 KiB payloads against both (as fast as the
# subscribers keep up, then at a fixed rate of 50% of NATS's maximum for latency), opens idle
# connections to measure memory, runs the slow-subscriber scenario, and writes the results into
# BENCHMARKS.md and bench/fanout.svg.
#
# Every fan-out run goes through bench/cost.sh, which adds to its JSON line the broker's CPU time
# per delivered message (`broker_cpu_us_per_delivery`: utime + stime from /proc/PID/stat of
# crier or nats-server around the run) and the load generator's (`client_cpu_us_per_delivery`,
# from the run's rusage), both in µs.
#
# Both brokers run as in production: Crier with `--jwt-secret`, every connection presenting a
# token (minted here, HS256, granting everything); each broker's metrics scraped every second
# (Crier's /metrics, NATS's /varz monitoring endpoint), as Prometheus would.
#
# Environment: DURATION (seconds per run, default 5), REPEAT (runs per configuration, default 3,
# the median is reported), CONNECTIONS (idle connections, default 19900: the machine's 20000
# file descriptors per process, less the broker's own).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5}
REPEAT=${REPEAT:-3}
CONNECTIONS=${CONNECTIONS:-19900}
command -v nats-server >/dev/null || { echo "compare.sh: nats-server is needed (Debian package nats-server)" >&2; exit 1; }

cargo build --release -p crier -p crier-bench
bench=target/release/crier-bench
work=$(mktemp -d)
results=$work/results.jsonl
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

nats_port=$(free_port)
nats_ws_port=$(free_port)
nats_http_port=$(free_port)
cat > "$work/nats.conf" <<EOF
listen: 127.0.0.1:$nats_port
http: 127.0.0.1:$nats_http_port
websocket { listen: "127.0.0.1:$nats_ws_port", no_tls: true }
EOF
nats-server -c "$work/nats.conf" > "$work/nats.log" 2>&1 &
nats_pid=$!
pids+=("$nats_pid")

crier_port=$(free_port)
jwt_secret=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
# HS256, granting every topic, valid for a day.
CRIER_BENCH_TOKEN=$(python3 - "$jwt_secret" <<'PY'
import base64, hashlib, hmac, json, sys, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
claims = b64(json.dumps({"sub": "bench", "exp": int(time.time()) + 86400,
                         "crier": {"subscribe": [">"], "publish": [">"]}}).encode())
signature = hmac.new(sys.argv[1].encode(), f"{header}.{claims}".encode(), hashlib.sha256).digest()
print(f"{header}.{claims}.{b64(signature)}")
PY
)
export CRIER_BENCH_TOKEN
# One machine makes every connection: lift the per-address limit (1000 by default).
target/release/crier --listen "127.0.0.1:$crier_port" --max-connections-per-ip 0 \
    --jwt-secret "$jwt_secret" --log warn > "$work/crier.log" 2>&1 &
crier_pid=$!
pids+=("$crier_pid")
sleep 1

# Scraped every second, as Prometheus would.
scrape() {
    while sleep 1; do curl -s -o /dev/null "$1" || true; done
}
scrape "http://127.0.0.1:$crier_port/metrics" &
pids+=("$!")
scrape "http://127.0.0.1:$nats_http_port/varz" &
pids+=("$!")

url_of() {
    case $1 in
        crier) echo "ws://127.0.0.1:$crier_port/ws" ;;
        nats-ws) echo "ws://127.0.0.1:$nats_ws_port" ;;
    esac
}

broker_pid_of() {
    case $1 in
        crier) echo "$crier_pid" ;;
        nats-ws) echo "$nats_pid" ;;
    esac
}

run() {
    local target=$1
    shift
    "$bench" --target "$target" --url "$(url_of "$target")" "$@" | head -n 1 | tee -a "$results"
}

# A run with the broker's and the load generator's CPU per delivery added to its JSON line.
run_with_cost() {
    local target=$1
    shift
    bench/cost.sh --summary "$(broker_pid_of "$target")" \
        --target "$target" --url "$(url_of "$target")" "$@" | tee -a "$results"
}

echo "== fan-out, as fast as subscribers keep up (${REPEAT} runs each, ${DURATION}s)"
for payload in 64 4096; do
    for subscribers in 1 100 1000; do
        for _ in $(seq "$REPEAT"); do
            for target in crier nats-ws; do
                run_with_cost "$target" fanout --subscribers "$subscribers" --payload "$payload" --duration "$DURATION"
            done
        done
    done
done

echo "== fan-out at 50% of NATS-WS's maximum publish rate: latency"
for payload in 64 4096; do
    for subscribers in 1 100 1000; do
        max=$(python3 - "$results" "$subscribers" "$payload" <<'PY'
import json, statistics, sys
path, subscribers, payload = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rates = [r["published_per_s"] for r in map(json.loads, open(path))
         if r.get("scenario") == "fanout" and r.get("target") == "nats-ws" and r.get("rate") is None
         and r["subscribers"] == subscribers and r["payload"] == payload]
print(statistics.median(rates))
PY
)
        rate=$(python3 -c "print(max(1.0, $max / 2))")
        for _ in $(seq "$REPEAT"); do
            for target in crier nats-ws; do
                run_with_cost "$target" fanout --subscribers "$subscribers" --payload "$payload" --duration "$DURATION" --rate "$rate"
            done
        done
    done
done

echo "== idle connections"
run crier connections --connections "$CONNECTIONS" --broker-pid "$crier_pid"
run nats-ws connections --connections "$CONNECTIONS" --broker-pid "$nats_pid"

echo "== one slow subscriber among fast ones"
run crier slow --broker-pid "$crier_pid" --duration "$DURATION"
run nats-ws slow --broker-pid "$nats_pid" --duration "$DURATION"

cp "$results" bench/results.jsonl
"$bench" report --input bench/results.jsonl --markdown BENCHMARKS.md --chart bench/fanout.svg
echo "compare.sh: wrote BENCHMARKS.md, bench/fanout.svg and bench/results.jsonl"
