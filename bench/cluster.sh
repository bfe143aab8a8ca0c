#!/usr/bin/env bash
# Crier over Redis: `crier-bench fanout` against one, two and three Crier nodes sharing the local
# Redis (127.0.0.1:6379), the same total subscribers spread round robin across the nodes, and
# one node with the memory backend for reference.
#
#   bench/cluster.sh
#   DURATION=10 REPEAT=3 bench/cluster.sh
#   NODES="1 3" SUBSCRIBERS=1000 PUBLISHERS=1 bench/cluster.sh
#
# Per run: delivered/s, p99, CPU per delivery of all the nodes together (utime + stime from
# /proc/PID/stat, as bench/cost.sh does) and of the load generator, CPU of the Redis server
# (per delivery and per publish), Redis commands per publish (`INFO stats`
# total_commands_processed, and by command from `INFO commandstats`), and losses. One JSON line
# per run goes to bench/cluster-results.jsonl (and to stderr as it runs), then a table to stdout.
#
# Environment: DURATION (seconds per run, default 5), REPEAT (runs per configuration, default 1),
# NODES (node counts over Redis, default "1 2 3"; "1" also runs the memory backend), SUBSCRIBERS
# (totals, default "100 1000"), PAYLOAD (bytes, default 64), PUBLISHERS (default 3: the same for
# every node count, and one per node at three), RATE (publishes a second in all, for latency below
# saturation; unset: as fast as subscribers keep up). Each cluster gets a fresh key prefix
# (bench-$RANDOM), deleted afterwards. The Redis is shared: anything else using it meanwhile is
# counted in its figures, and, as for every benchmark on this 2-core machine, nothing else should
# run meanwhile (nodes, Redis and the load generator already share both cores).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5}
REPEAT=${REPEAT:-1}
NODES=${NODES:-1 2 3}
SUBSCRIBERS=${SUBSCRIBERS:-100 1000}
PAYLOAD=${PAYLOAD:-64}
PUBLISHERS=${PUBLISHERS:-3}
# Publishes a second in all (split among the publishers); unset: as fast as subscribers keep up.
RATE=${RATE:-}
REDIS_PORT=6379
REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0

command -v redis-cli >/dev/null || { echo "cluster.sh: redis-cli is needed" >&2; exit 1; }
redis-cli -p "$REDIS_PORT" ping >/dev/null || { echo "cluster.sh: no Redis on 127.0.0.1:$REDIS_PORT" >&2; exit 1; }
# The redis-server listening on the port (there may be others, started by tests on other ports).
redis_pid=$(ss -ltnpH "sport = :$REDIS_PORT" | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2)
pgrep -x redis-server | grep -qx "$redis_pid" || { echo "cluster.sh: no redis-server process listens on $REDIS_PORT" >&2; exit 1; }

cargo build --release -p crier -p crier-bench
crier=target/release/crier
bench=target/release/crier-bench
"$crier" --help | grep -q -- --redis-prefix || { echo "cluster.sh: this Crier has no Redis backend (--redis-prefix)" >&2; exit 1; }

work=$(mktemp -d)
results=$work/results.jsonl
pids=()
prefix=
stop_nodes() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    pids=()
    if [ -n "$prefix" ]; then
        redis-cli -p "$REDIS_PORT" --scan --pattern "$prefix:*" | xargs -r -n 500 redis-cli -p "$REDIS_PORT" del >/dev/null
        prefix=
    fi
}
trap 'stop_nodes; rm -rf "$work"' EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_nodes BACKEND N: N nodes on free ports; sets pids and urls.
urls=
start_nodes() {
    local backend=$1 n=$2 args=()
    if [ "$backend" = redis ]; then
        prefix=bench-$RANDOM
        args=(--redis "$REDIS_URL" --redis-prefix "$prefix")
    fi
    urls=
    for i in $(seq "$n"); do
        local port
        port=$(free_port)
        # One machine makes every connection: lift the per-address limit (1000 by default).
        "$crier" --listen "127.0.0.1:$port" --max-connections-per-ip 0 --log warn "${args[@]}" \
            > "$work/crier-$i.log" 2>&1 &
        pids+=($!)
        urls+=${urls:+,}ws://127.0.0.1:$port/ws
        for _ in $(seq 100); do
            curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
            sleep 0.1
        done
        curl -sf "http://127.0.0.1:$port/readyz" >/dev/null || {
            echo "cluster.sh: node $i did not get ready:" >&2
            cat "$work/crier-$i.log" >&2
            exit 1
        }
        # A Crier that took the flags but not the backend would share nothing between its nodes.
        curl -sf "http://127.0.0.1:$port/api/topics" | grep -q "\"backend\":\"$backend\"" || {
            echo "cluster.sh: node $i does not say it runs the $backend backend (GET /api/topics)" >&2
            exit 1
        }
    done
}

# run BACKEND SUBSCRIBERS: one fanout over the running nodes, measured; appends its JSON line.
run() {
    local backend=$1 subscribers=$2
    local node_pids rate=()
    node_pids=$(IFS=,; echo "${pids[*]}")
    [ -z "$RATE" ] || rate=(--rate "$RATE")
    python3 - "$backend" "$node_pids" "$redis_pid" "$REDIS_PORT" \
        "$bench" --url "$urls" fanout --subscribers "$subscribers" --payload "$PAYLOAD" \
        --publishers "$PUBLISHERS" --duration "$DURATION" "${rate[@]}" <<'PY' | tee -a "$results" >&2
import json, os, subprocess, sys

backend, node_pids, redis_pid, redis_port = sys.argv[1:5]
command = sys.argv[5:]
hz = os.sysconf("SC_CLK_TCK")

def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / hz  # utime, stime

def nodes_seconds():
    return sum(cpu_seconds(pid) for pid in node_pids.split(","))

def redis_counts():
    """total_commands_processed and calls by command, in one INFO (which counts itself)."""
    text = subprocess.run(["redis-cli", "-p", redis_port, "info", "stats", "commandstats"],
                          capture_output=True, text=True, check=True).stdout
    total, calls = 0, {}
    for line in text.splitlines():
        if line.startswith("total_commands_processed:"):
            total = int(line.split(":")[1])
        elif line.startswith("cmdstat_"):
            name, stats = line[len("cmdstat_"):].split(":", 1)
            calls[name] = int(dict(kv.split("=") for kv in stats.split(","))["calls"])
    return total, calls

nodes_before, redis_before = nodes_seconds(), cpu_seconds(redis_pid)
total_before, calls_before = redis_counts()
child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
output = child.stdout.read()
_, status, usage = os.wait4(child.pid, 0)
nodes_cpu, redis_cpu = nodes_seconds() - nodes_before, cpu_seconds(redis_pid) - redis_before
total_after, calls_after = redis_counts()
if status != 0:
    sys.exit(f"cluster.sh: crier-bench failed ({status})")

summary = json.loads(output.splitlines()[0])
delivered = max(summary["delivered"], 1)
published = max(summary["published"], 1)
# Less the INFO before the run, which the one after counts.
commands = total_after - total_before - 1
calls = {name: n - calls_before.get(name, 0) - (name == "info")
         for name, n in calls_after.items()}
summary.update({
    "backend": backend,
    "broker_cpu_us_per_delivery": round(nodes_cpu * 1e6 / delivered, 3),
    "client_cpu_us_per_delivery": round((usage.ru_utime + usage.ru_stime) * 1e6 / delivered, 3),
    "redis_cpu_us_per_delivery": round(redis_cpu * 1e6 / delivered, 3),
    "redis_cpu_us_per_publish": round(redis_cpu * 1e6 / published, 3),
    "redis_commands_per_publish": round(commands / published, 3),
    "redis_calls_per_publish": {name: round(n / published, 3)
                                for name, n in sorted(calls.items()) if n > 0},
})
print(json.dumps(summary))
PY
}

for n in $NODES; do
    backends=(redis)
    [ "$n" = 1 ] && backends=(memory redis)
    for backend in "${backends[@]}"; do
        echo "== $n node(s), $backend backend" >&2
        start_nodes "$backend" "$n"
        for subscribers in $SUBSCRIBERS; do
            for _ in $(seq "$REPEAT"); do
                run "$backend" "$subscribers"
            done
        done
        stop_nodes
    done
done

cp "$results" bench/cluster-results.jsonl
python3 - "$results" <<'PY'
import json, sys

runs = [json.loads(line) for line in open(sys.argv[1])]
columns = [
    ("backend", lambda r: r["backend"]),
    ("nodes", lambda r: r["nodes"]),
    ("subs", lambda r: r["subscribers"]),
    ("pubs", lambda r: r["publishers"]),
    ("payload", lambda r: f'{r["payload"]} B'),
    ("delivered/s", lambda r: f'{r["delivered_per_s"]:,.0f}'),
    ("p99 µs", lambda r: r["latency_us"]["p99"]),
    ("nodes µs/dlv", lambda r: r["broker_cpu_us_per_delivery"]),
    ("client µs/dlv", lambda r: r["client_cpu_us_per_delivery"]),
    ("redis µs/dlv", lambda r: r["redis_cpu_us_per_delivery"]),
    ("redis µs/pub", lambda r: r["redis_cpu_us_per_publish"]),
    ("cmds/pub", lambda r: r["redis_commands_per_publish"]),
    ("evalsha/pub", lambda r: r["redis_calls_per_publish"].get("evalsha", 0)),
    ("publish/pub", lambda r: r["redis_calls_per_publish"].get("publish", 0)),
    ("lost", lambda r: r["lost"]),
    ("dup", lambda r: r["duplicated"]),
    ("disorder", lambda r: r["out_of_order"]),
    ("dropped", lambda r: r["broker_dropped"]),
]
rows = [[name for name, _ in columns]] + [[str(cell(r)) for _, cell in columns] for r in runs]
widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
for row in rows:
    print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
print("\nRedis calls per publish, by command:")
for r in runs:
    calls = ", ".join(f"{k} {v}" for k, v in r["redis_calls_per_publish"].items())
    print(f'  {r["backend"]:>6} × {r["nodes"]}, {r["subscribers"]} subscribers: {calls or "none"}')
PY
echo "cluster.sh: wrote bench/cluster-results.jsonl"
