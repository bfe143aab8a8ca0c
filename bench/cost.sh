#!/usr/bin/env bash
# CPU cost per delivered message, split between the broker and the load generator.
#
#   bench/cost.sh BROKER_PID [crier-bench arguments...]
#   bench/cost.sh "$(pgrep -x crier)" fanout --subscribers 100 --payload 64
#   bench/cost.sh "$(pgrep -x nats-server)" --target nats-ws --url ws://127.0.0.1:PORT fanout
#   bench/cost.sh --summary BROKER_PID [crier-bench arguments...]
#   CRIER_BENCH=/tmp/crier-bench-before bench/cost.sh BROKER_PID fanout   # another load generator
#
# Prints {target, subscribers, payload, delivered_per_s} and the two figures; with --summary
# (what bench/compare.sh uses), crier-bench's whole JSON summary line with the two figures added.
#
# Throughput on a shared, noisy 2-core machine moves by ±15% from run to run; CPU time per
# delivery moves far less, and says which side (broker or client) a change helped. The broker's
# share is utime + stime from /proc/PID/stat around one crier-bench run; the client's is the
# run's own rusage.
set -euo pipefail
cd "$(dirname "$0")/.."
summary_line=0
if [ "${1:-}" = --summary ]; then
    summary_line=1
    shift
fi
broker=${1:?usage: bench/cost.sh [--summary] BROKER_PID [crier-bench arguments...]}
shift
bench=${CRIER_BENCH:-target/release/crier-bench}
[ -x "$bench" ] || cargo build --release -p crier-bench

exec python3 - "$summary_line" "$broker" "$bench" "$@" <<'PY'
import json, os, subprocess, sys

summary_line, broker, command = sys.argv[1] == "1", sys.argv[2], sys.argv[3:]
hz = os.sysconf("SC_CLK_TCK")

def broker_seconds():
    fields = open(f"/proc/{broker}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / hz  # utime, stime

before = broker_seconds()
child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
output = child.stdout.read()
_, status, usage = os.wait4(child.pid, 0)
broker_cpu = broker_seconds() - before
if status != 0:
    sys.exit(f"cost.sh: crier-bench failed ({status})")
summary = json.loads(output.splitlines()[0])
delivered = max(summary.get("delivered", 0), 1)
cost = {
    "broker_cpu_us_per_delivery": round(broker_cpu * 1e6 / delivered, 3),
    "client_cpu_us_per_delivery": round((usage.ru_utime + usage.ru_stime) * 1e6 / delivered, 3),
}
if summary_line:
    print(json.dumps({**summary, **cost}, sort_keys=True, separators=(",", ":")))
else:
    print(json.dumps({
        "target": summary.get("target"),
        "subscribers": summary.get("subscribers"),
        "payload": summary.get("payload"),
        "delivered_per_s": summary.get("delivered_per_s"),
        **cost,
    }))
PY
