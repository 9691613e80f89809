#!/usr/bin/env bash
# Brings the whole mall up: builds (release), ensures a broker and the topic, starts orders,
# products and delivery in the background (logs and pids under data/), waits until every
# /health answers 200. Idempotent: run it again and it starts only what is not running.
# "Running" means the pid in data/<name>.pid is alive (not a zombie), runs this checkout's
# binary and started when the pid file says; a stale pid file is reported and replaced.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
check_prerequisites

say "building the services (release)"
cargo build --release --bin orders --bin products --bin delivery --bin mall-topic

ensure_broker
target/release/mall-topic ensure

mkdir -p "$DATA"
for svc in "${SERVICES[@]}"; do
  pidfile="$DATA/$svc.pid"
  program="$ROOT/target/release/$svc"
  if pid_alive "$pidfile" "$program"; then
    say "$svc already running (pid $PIDFILE_PID)"
    # A one-field pid file from older scripts: record the start time now that it is verified.
    [[ -n "$PIDFILE_START" ]] || echo "$PIDFILE_PID $PROC_START" >"$pidfile"
    continue
  fi
  stale="$PID_STALE"
  port="${DEFAULT_PORT[$svc]}"
  if port_open "127.0.0.1:$port"; then
    die "port $port (for $svc) is taken by another process; stop it or run scripts/down.sh"
  fi
  if [[ -n "$stale" ]]; then
    say "data/$svc.pid is stale ($stale); starting $svc"
  fi
  PORT="$port" DATABASE_URL="$DATA/$svc.db" RUST_LOG="${RUST_LOG:-info}" \
    nohup "$program" >>"$DATA/$svc.log" 2>&1 </dev/null &
  pid=$!
  record_pid "$pidfile" "$pid" "$program"
  say "started $svc on :$port, pid $pid (log data/$svc.log)"
done

for svc in "${SERVICES[@]}"; do
  port="${DEFAULT_PORT[$svc]}"
  for i in $(seq 1 300); do
    code="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health" || true)"
    [[ "$code" == 200 ]] && break
    pid_alive "$DATA/$svc.pid" "$ROOT/target/release/$svc" || die "$svc exited; last lines of data/$svc.log:
$(tail -n 15 "$DATA/$svc.log")"
    (( i == 300 )) && die "$svc did not become healthy within 30 s; see data/$svc.log"
    sleep 0.1
  done
done

cat <<EOT

The 12st Mall is up:
  dashboard http://127.0.0.1:8081/   (live orders, catalog, deliveries, timelines, dead letters)
  orders    http://127.0.0.1:8081   (GET /orders, /orders/{id}, /orders/{id}/events, /products)
  products  http://127.0.0.1:8085   (GET /products, /products/{id})
  delivery  http://127.0.0.1:8082   (GET /deliveries, /deliveries/{id})
  broker    $KAFKA_BROKERS, topic $KAFKA_TOPIC

Try the seed lab (httpie; curl works too, see README.md):
  http :8085/products                                   # TV has stock 10
  http :8081/orders productId:=1 quantity:=1 customerId=1@uengine.org customerAddr=Seoul
  http :8081/orders/1                                   # OrderCompleted
  http :8081/orders/1/events                            # the saga, step by step
  http PATCH :8081/orders/1 state=OrderCancelled        # stock back to 10
  http :8081/orders productId:=1 quantity:=100 customerId=1@uengine.org   # ProductOutOfStock → rollback
  scripts/watch.sh                                      # every event on the topic, one JSON line each
  scripts/demo.sh                                       # all of the above, scripted

Stop with scripts/down.sh (add --wipe to delete data/).
EOT
