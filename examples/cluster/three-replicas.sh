#!/bin/sh
# Three headend replicas on this machine, sharing PostgreSQL and NATS JetStream, and one
# gateway agent per site of examples/assets.yaml that knows all three (docs/cluster.md).
#
#   examples/cluster/three-replicas.sh        # Ctrl-C stops everything
#
# Needs: the venv of `python3 dev.py demo` (or `der` on PATH), PostgreSQL with a database
# for the cluster (DATABASE_URL), NATS 2.9+ with JetStream (HEADEND_BUS_URL).
# REST: http://127.0.0.1:3001, :3002, :3003; agents dial 127.0.0.1:50051..50053.
set -eu
cd "$(dirname "$0")/../.."
DER=${DER:-.venv/bin/der}
[ -x "$DER" ] || DER=der
export ASSETS_PATH="${ASSETS_PATH:-examples/assets.yaml}"
export DATABASE_URL="${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/postgres}"
export HEADEND_BUS_URL="${HEADEND_BUS_URL:-nats://127.0.0.1:4222}"
export HEADEND_BUS_NAMESPACE="${HEADEND_BUS_NAMESPACE:-der-example}"
LOGS="${LOGS:-der-data/cluster}"
mkdir -p "$LOGS"

pids=""
stop() {
    trap - INT TERM EXIT
    [ -n "$pids" ] && kill $pids 2>/dev/null
    wait 2>/dev/null
    echo "stopped; logs in $LOGS"
}
trap stop INT TERM EXIT

for n in 1 2 3; do
    HEADEND_ID="headend-$n" HEADEND_HTTP_ADDR="127.0.0.1:300$n" \
        HEADEND_GRPC_ADDR="127.0.0.1:5005$n" \
        "$DER" headend >"$LOGS/headend-$n.log" 2>&1 &
    pids="$pids $!"
done

for n in 1 2 3; do  # wait for REST (a replica answers 503 while it waits for a service)
    for _ in $(seq 1 60); do
        if curl -fs "http://127.0.0.1:300$n/healthz" >/dev/null 2>&1; then break; fi
        sleep 0.5
    done
    echo "replica headend-$n: http://127.0.0.1:300$n ($(curl -s "http://127.0.0.1:300$n/healthz"))"
done

HEADENDS=127.0.0.1:50051,127.0.0.1:50052,127.0.0.1:50053
for gateway in gw-north:ed7332b8-d686-44d3-938c-9ddfd76b4791 \
    gw-ridge:6319b625-eebf-4fa9-a64a-af7409f6c1b5; do
    name=${gateway%%:*}
    AGENT_BUFFER_PATH="$LOGS/agent-$name.sqlite3" \
        "$DER" agent --headend "$HEADENDS" --site-id "${gateway#*:}" --gateway-id "$name" \
        --config examples/agent.yaml >"$LOGS/agent-$name.log" 2>&1 &
    pids="$pids $!"
done

echo "two gateway agents started; try: curl -s http://127.0.0.1:3002/agents"
echo "Ctrl-C stops the replicas and agents"
wait
