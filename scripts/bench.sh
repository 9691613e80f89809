#!/usr/bin/env bash
# The benchmark: builds the services and `saga-bench` (release), installs the tansu broker if
# needed, then runs `saga-bench`, which starts its own broker and services on free ports with
# fresh databases in a temporary run directory and prints figures (it asserts nothing).
#
#   scripts/bench.sh                          # floor, 300/s for 30 s, 1000/s for 60 s, fetch-wait table
#   scripts/bench.sh --rate 500 --duration 30 # one open-loop rate
#   scripts/bench.sh --find-max               # rising rates until one is not held
#   scripts/bench.sh --fetch-wait-table       # saga p50 and idle CPU per KAFKA_FETCH_WAIT_MAX_MS
#   scripts/bench.sh --preload 1000000 --rate 300   # with a million orders of history
#
# Flags are forwarded; scripts/bench.sh --help lists them all.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
if declare -F check_prerequisites >/dev/null; then
  check_prerequisites
fi

say "building the services and saga-bench (release)"
cargo build --release --bin orders --bin products --bin delivery --bin saga-bench
read -r -a broker < <(broker_args)
exec target/release/saga-bench --bin-dir target/release "${broker[@]}" "$@"
