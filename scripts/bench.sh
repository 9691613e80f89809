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
#
# --broker kafka|tansu|both (default: BROKER, else kafka); other flags are forwarded;
# scripts/bench.sh --help lists them all.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
check_prerequisites

brokers=("$BROKER")
args=()
while (( $# )); do
  case "$1" in
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
