#!/usr/bin/env bash
# The benchmark: builds the services and `saga-bench` (release), fetches the broker if needed,
# then runs `saga-bench`, which starts its own broker and services on free ports with fresh
# databases in a temporary run directory and prints figures (it asserts nothing).
#
#   scripts/bench.sh                          # floor, 300/s for 30 s, 1000/s for 60 s, fetch-wait table
#   scripts/bench.sh --broker both            # all of it on Apache Kafka, then on tansu, one after the other
#   scripts/bench.sh --rate 500 --duration 30 # one open-loop rate
#   scripts/bench.sh --find-max               # rising rates until one is not held
#   scripts/bench.sh --fetch-wait-table       # saga p50 and idle CPU per KAFKA_FETCH_WAIT_MAX_MS
#   scripts/bench.sh --preload 1000000 --rate 300   # with a million orders of history
#   scripts/bench.sh --postgres local --rate 300    # on a throwaway PostgreSQL server (removed at exit)
#   scripts/bench.sh --postgres local --compare-instances 3 --partitions 6 --pg-delay 1 --rate 10
#
# --postgres local starts a PostgreSQL server of its own (scripts/lib.sh's start_postgres, which
# preloads pg_stat_statements: the bench prints statements per saga); --postgres URL uses yours.
# --broker kafka|tansu|both (default: BROKER, else kafka); other flags are forwarded;
# scripts/bench.sh --help lists them all.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
check_prerequisites

brokers=("$BROKER")
args=()
pg_dir="" # the throwaway PostgreSQL server's data directory, if any
trap '[[ -n "$pg_dir" ]] && { stop_postgres "$pg_dir"; rm -rf "$pg_dir"; }' EXIT
while (( $# )); do
  case "$1" in
    --postgres)
      (( $# >= 2 )) || die "--postgres wants a server URL, or local"
      if [[ "$2" == local ]]; then
        ensure_postgres
        pg_dir="$(mktemp -d)"
        pg_port=""
        for _ in $(seq 1 50); do
          candidate=$((20000 + RANDOM % 12000))
          port_open "127.0.0.1:$candidate" || { pg_port="$candidate"; break; }
        done
        [[ -n "$pg_port" ]] || die "no free port for PostgreSQL"
        start_postgres "$pg_dir" "$pg_port"
        args+=(--postgres "$(pg_local_url "$pg_dir" "$pg_port")")
      else
        args+=(--postgres "$2")
      fi
      shift 2 ;;
    --broker)
      (( $# >= 2 )) || die "--broker wants kafka, tansu or both"
      case "$2" in
        kafka|tansu) brokers=("$2") ;;
        both) brokers=(kafka tansu) ;;
        *) die "--broker wants kafka, tansu or both, not '$2'" ;;
      esac
      shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done

say "building the services and saga-bench (release)"
cargo build --release --bin orders --bin products --bin delivery --bin saga-bench
status=0
for b in "${brokers[@]}"; do
  read -r -a broker < <(BROKER="$b" broker_args)
  (( ${#brokers[@]} == 1 )) || say "=== on $b ==="
  extra=()
  # tansu holds every fetch for the whole wait: its default is the one its table chose.
  [[ "$b" == tansu && -z "${KAFKA_FETCH_WAIT_MAX_MS:-}" ]] && extra=(--fetch-wait 20)
  target/release/saga-bench --bin-dir target/release "${broker[@]}" "${extra[@]}" "${args[@]}" || status=$?
done
exit "$status"
