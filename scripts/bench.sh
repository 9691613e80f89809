#!/usr/bin/env bash
# Measures the running mall (start it with scripts/up.sh): POST /orders round trip, saga latency
# OrderPlaced → OrderCompleted (median, p95), and burst throughput. Prints figures; asserts
# nothing. Arguments: [sequential orders] [burst] [concurrency], default 100 500 20.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
cargo build --release --bin saga-bench
exec target/release/saga-bench "$@"
