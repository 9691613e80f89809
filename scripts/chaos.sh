#!/usr/bin/env bash
# The fault-injection run: builds the services and the `chaos` program (release), fetches Apache
# Kafka's jars if needed (BROKER=tansu: installs tansu), then runs `chaos`, which starts its own broker and services on free
# ports with fresh databases in a temporary run directory, drives a mixed workload while it
# kills, stops and restarts processes at moments drawn from a seeded RNG, and checks the
# invariants. Ends with `N passed, N failed`; exits non-zero on any violation.
#
#   scripts/chaos.sh                                             # the short run (~1-3 min)
#   scripts/chaos.sh --seed 12345                                # replay a run's plan and choices
#   scripts/chaos.sh --orders 10000 --kills 20 --broker-restarts 3   # the long run
#
# Flags: --orders N (500) --kills N (5) --broker-restarts N (1) --stops N (1) --terms N (1)
#        --rate R orders/s (25) --seed N --keep (keep the run directory even when it passes)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
if declare -F check_prerequisites >/dev/null; then
  check_prerequisites
fi

say "building the services and chaos (release)"
cargo build --release --bin orders --bin products --bin delivery --bin chaos
read -r -a broker < <(broker_args)
exec target/release/chaos --bin-dir target/release "${broker[@]}" "$@"
