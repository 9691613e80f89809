#!/usr/bin/env bash
# Brings the whole mall up: builds (release), ensures a broker and the topic, starts orders,
# products and delivery in the background (logs and pids under data/), waits until every
# /health answers 200. Idempotent: run it again and it starts only what is not running.
# "Running" means the pid in data/<name>.pid is alive (not a zombie), runs this checkout's
# binary and started when the pid file says; a stale pid file is reported and replaced.
#
#   scripts/up.sh                 # one instance of each service, SQLite databases data/<svc>.db
#   scripts/up.sh --instances 3   # three of each, sharing one PostgreSQL database per service
#
# With --instances N (N >= 1): a PostgreSQL server with data in data/postgres on 127.0.0.1 port
# POSTGRES_PORT (default 5433), installed with apt-get if missing (or, with POSTGRES_URL set to
# an existing server's maintenance database, e.g. postgres://me:pw@db:5432/postgres, that server:
# no server is installed or started, only psql if missing), databases orders, products and delivery created if missing,
# the topic created with KAFKA_PARTITIONS (default 6 in this mode) partitions when missing, and
# instance k of a service as data/<svc>-<k>.pid / .log, INSTANCE_ID=<svc>-<k>, on the service's
# port + 100·(k-1): orders 8081, 8181, 8281…, products 8085, 8185…, delivery 8082, 8182…
# scripts/down.sh stops every instance, whatever N was, and the PostgreSQL server.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

usage="usage: scripts/up.sh [--instances N]"
instances=0 # 0: the single-instance SQLite mall
while (( $# )); do
  case "$1" in
    --instances) (( $# >= 2 )) || die "$usage"; instances="$2"; shift 2 ;;
    --instances=*) instances="${1#*=}"; shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) die "$usage" ;;
  esac
  # Instance 500 of products listens on 8085 + 100·499 = 58985.
  if [[ ! "$instances" =~ ^[0-9]+$ ]] || (( 10#$instances < 1 || 10#$instances > 500 )); then
    die "--instances wants a whole number from 1 to 500, not '$instances'"
  fi
  instances=$((10#$instances))
done

check_prerequisites

# instance_port SVC K: the port of instance K of SVC.
instance_port() { echo $((DEFAULT_PORT[$1] + 100 * ($2 - 1))); }

# start_one NAME SVC PORT [VAR=value...]: starts target/release/SVC as NAME (pid file
# data/NAME.pid, log data/NAME.log) on PORT with the extra environment, unless it runs already.
start_one() {
  local name="$1" svc="$2" port="$3" pidfile="$DATA/$1.pid" program="$ROOT/target/release/$2"
  local stale pid
  shift 3
  if pid_alive "$pidfile" "$program"; then
    say "$name already running (pid $PIDFILE_PID)"
    # A one-field pid file from older scripts: record the start time now that it is verified.
    [[ -n "$PIDFILE_START" ]] || echo "$PIDFILE_PID $PROC_START" >"$pidfile"
    return 0
  fi
  stale="$PID_STALE"
  if port_open "127.0.0.1:$port"; then
    die "port $port (for $name) is taken by another process; stop it or run scripts/down.sh"
  fi
  if [[ -n "$stale" ]]; then
    say "data/$name.pid is stale ($stale); starting $name"
  fi
  env PORT="$port" RUST_LOG="${RUST_LOG:-info}" "$@" \
    nohup "$program" >>"$DATA/$name.log" 2>&1 </dev/null &
  pid=$!
  record_pid "$pidfile" "$pid" "$program"
  say "started $name on :$port, pid $pid (log data/$name.log)"
}

# wait_healthy NAME SVC PORT: waits (30 s at most) until NAME's /health answers 200.
wait_healthy() {
  local name="$1" svc="$2" port="$3" code i
  for i in $(seq 1 300); do
    code="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health" || true)"
    [[ "$code" == 200 ]] && return 0
    pid_alive "$DATA/$name.pid" "$ROOT/target/release/$svc" || die "$name exited; last lines of data/$name.log:
$(tail -n 15 "$DATA/$name.log")"
    (( i == 300 )) && die "$name did not become healthy within 30 s; see data/$name.log"
    sleep 0.1
  done
}

# The mall runs in one mode at a time: both would want the same ports.
mkdir -p "$DATA"
shopt -s nullglob
for svc in "${SERVICES[@]}"; do
  if (( instances )); then
    if pid_alive "$DATA/$svc.pid" "$ROOT/target/release/$svc"; then
      die "$svc runs as the single SQLite instance (data/$svc.pid, pid $PIDFILE_PID); stop the mall with scripts/down.sh before scripts/up.sh --instances $instances"
    fi
  else
    for pidfile in "$DATA/$svc"-*.pid; do
      name="$(basename "$pidfile" .pid)"
      [[ "${name#"$svc"-}" =~ ^[0-9]+$ ]] || continue
      if pid_alive "$pidfile" "$ROOT/target/release/$svc"; then
        die "$name runs (pid $PIDFILE_PID): the mall is up as several instances on PostgreSQL; scripts/up.sh --instances N keeps that, or stop it with scripts/down.sh first"
      fi
    done
  fi
done
shopt -u nullglob

say "building the services (release)"
cargo build --release --bin orders --bin products --bin delivery --bin mall-topic

ensure_broker
if (( instances )); then
  # Read by mall-topic (and the services) only when the topic has to be created.
  export KAFKA_PARTITIONS="${KAFKA_PARTITIONS:-6}"
fi
topic_line="$(target/release/mall-topic ensure)" || die "cannot create the topics on $KAFKA_BROKERS"
partitions="$(sed -n 's/.*(\([0-9]*\) partitions).*/\1/p' <<<"$topic_line")"

if (( instances == 0 )); then
  for svc in "${SERVICES[@]}"; do
    start_one "$svc" "$svc" "${DEFAULT_PORT[$svc]}" DATABASE_URL="$DATA/$svc.db"
  done
  for svc in "${SERVICES[@]}"; do
    wait_healthy "$svc" "$svc" "${DEFAULT_PORT[$svc]}"
  done

  cat <<EOT

The 12st Mall is up:
  dashboard http://127.0.0.1:8081/   (live orders, catalog, deliveries, timelines, dead letters)
  orders    http://127.0.0.1:8081   (GET /orders, /orders/{id}, /orders/{id}/events, /products)
  products  http://127.0.0.1:8085   (GET /products, /products/{id})
  delivery  http://127.0.0.1:8082   (GET /deliveries, /deliveries/{id})
  broker    $KAFKA_BROKERS, topic $KAFKA_TOPIC ($BROKER_LINE)

Kafka's own tools, from scripts/kafka/bin (with or without .sh):
  export PATH="\$PWD/scripts/kafka/bin:\$PATH"
  kafka-console-consumer.sh --bootstrap-server http://localhost:9092 --topic eventTopic --from-beginning
  kafka-consumer-groups.sh --bootstrap-server localhost:9092 --describe --all-groups   # each service's lag

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
  exit 0
fi

# --- several instances on PostgreSQL ---------------------------------------------------------
ensure_postgres
if [[ -n "${POSTGRES_URL:-}" ]]; then
  server_url="$POSTGRES_URL"
  pg_line="$(pg_redact "$server_url") (POSTGRES_URL; not started here)"
  say "using the PostgreSQL server of POSTGRES_URL: $(pg_redact "$server_url")"
else
  pg_port="${POSTGRES_PORT:-5433}"
  start_postgres "$DATA/postgres" "$pg_port"
  server_url="$(pg_local_url "$DATA/postgres" "$pg_port")"
  pg_line="$(pg_redact "$server_url") (data data/postgres, log data/postgres/server.log, password in data/postgres.password)"
fi
create_databases "$server_url" "${SERVICES[@]}"

# Every orders instance serves the dashboard, which calls products and delivery from its origin.
dashboards=""
for k in $(seq 1 "$instances"); do
  p="$(instance_port orders "$k")"
  dashboards+="${dashboards:+,}http://127.0.0.1:$p,http://localhost:$p"
done
for k in $(seq 1 "$instances"); do
  for svc in "${SERVICES[@]}"; do
    start_one "$svc-$k" "$svc" "$(instance_port "$svc" "$k")" INSTANCE_ID="$svc-$k" \
      DATABASE_URL="$(pg_url_with_db "$server_url" "$svc")" KAFKA_PARTITIONS="$KAFKA_PARTITIONS" \
      CORS_ORIGINS="${CORS_ORIGINS:-$dashboards}"
  done
done
for k in $(seq 1 "$instances"); do
  for svc in "${SERVICES[@]}"; do
    wait_healthy "$svc-$k" "$svc" "$(instance_port "$svc" "$k")"
  done
done

# Instances left from an earlier, larger --instances keep running until scripts/down.sh.
extra=""
shopt -s nullglob
for svc in "${SERVICES[@]}"; do
  for pidfile in "$DATA/$svc"-*.pid; do
    name="$(basename "$pidfile" .pid)"
    k="${name#"$svc"-}"
    [[ "$k" =~ ^[0-9]+$ ]] || continue
    (( 10#$k > instances )) || continue
    if pid_alive "$pidfile" "$ROOT/target/release/$svc"; then
      extra+=" $name (:$(instance_port "$svc" "$((10#$k))"))"
    fi
  done
done
shopt -u nullglob

echo
echo "The 12st Mall is up: $instances instance(s) of each service on PostgreSQL"
echo "  dashboard  http://127.0.0.1:8081/   (on every orders instance)"
for svc in "${SERVICES[@]}"; do
  for k in $(seq 1 "$instances"); do
    printf '  %-10s http://127.0.0.1:%s   (INSTANCE_ID %s, log data/%s.log)\n' \
      "$svc-$k" "$(instance_port "$svc" "$k")" "$svc-$k" "$svc-$k"
  done
done
[[ -z "$extra" ]] || echo "  also still running, from an earlier --instances:$extra"
echo "  postgres   $pg_line"
databases=()
for svc in "${SERVICES[@]}"; do databases+=("$(pg_redact "$(pg_url_with_db "$server_url" "$svc")")"); done
echo "             databases: ${databases[*]}"
echo "  broker     $KAFKA_BROKERS, topic $KAFKA_TOPIC, ${partitions:-?} partition(s)"
if [[ -z "$partitions" ]]; then
  echo "  note: the topic's partitions could not be counted;"
  echo "        mall-topic creates a missing topic with KAFKA_PARTITIONS=$KAFKA_PARTITIONS but never grows one."
elif (( partitions < KAFKA_PARTITIONS )); then
  echo "  note: the topic has $partitions partition(s), fewer than KAFKA_PARTITIONS=$KAFKA_PARTITIONS: it existed"
  echo "        already, and mall-topic creates a missing topic but never adds partitions (adding"
  echo "        some would move keys: an order's events would no longer be in order). Instances share $partitions partition(s), so at"
  echo "        most $partitions of each service consume; the others stand by. For $KAFKA_PARTITIONS, start over:"
  echo "        scripts/down.sh --wipe (deletes every database and event), then this again."
fi
if [[ -n "$partitions" ]] && (( partitions < instances )); then
  echo "  note: more instances ($instances) than partitions ($partitions): some hold no partition (standby)."
fi
cat <<EOT

Try it (any instance answers for the whole service; they share its database):
  http :8081/orders productId:=1 quantity:=1 customerId=1@uengine.org customerAddr=Seoul
  http :$(instance_port orders "$instances")/orders/1                                   # the same order, another instance
  http :8085/products                                   # stock as every products instance sees it
  curl -s :8081/health                                  # this instance's partitions and relay (standby or not)

Stop every instance and PostgreSQL with scripts/down.sh (add --wipe to delete data/).
EOT
